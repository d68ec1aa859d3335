# pipeline.py in the paper's regime on one GPU: SmolLM2-135M as the teacher (checked and scored, not trained),
# English books tokenized with its tokenizer, about 4M training tokens (e.g. 28 novels). Sized by FLOPs for about
# 10 minutes of one H100 at 25 TFLOP/s: labels 4M tokens x 0.54 GFLOPs, 18 students of 4.1M tokens x 0.1 GFLOPs,
# KD's teacher forward 3 x 4.1M tokens x 0.28 GFLOPs; not yet timed on a GPU.
# python pipeline.py config/pipeline_smollm2_gpu.py --data_dir=data/books28-smollm2 --out_dir=out-smollm2-gpu
teacher = "smollm2"
n_layer = 6  # the students
n_head = 4
n_embd = 256  # the CoCoMix student; NTP's and KD's width match its active parameters
block_size = 256
batch_size = 64
batch_tokens = 16384
learning_rate = 1e-3
sae_layer = 14  # the output of block 14 of 0..29: the middle of the teacher
n_concepts = 8192
sae_k = 32
sae_iters = 2000  # 8M activations
k_attr = 4
concept_layer = 3
concept_topk = 32
student_iters = 250  # 4.1M tokens per student
variants = "kd,prediction_only,intervention,residual_slot"
eval_interval = 25
eval_iters = 20
steer_samples = 64
steer_tokens = 100
inspect_concepts = 16
