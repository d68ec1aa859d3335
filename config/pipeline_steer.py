# pipeline.py's steerable student on the built-in corpus (docs/steering.md): the default run with one seed, CoCoMix
# labelled by SAE activation (paper Fig. 6a) instead of attribution, its concept loss weighted 1 instead of the
# paper's 0.1, and 4 concepts compressed instead of 16. Not the paper's settings: with the paper's, no student here
# steers. Steering a topic's concept then fills the text with that topic's words (steering.py measures it).
# python pipeline.py config/pipeline_steer.py
# python steering.py --student=out-steerable/4x128-c2-300it/cocomix-1
out_dir = "out-steerable"
label_score = "activation"
lam_concept = 1.0
concept_topk = 4
seeds = 1
variants = ""
