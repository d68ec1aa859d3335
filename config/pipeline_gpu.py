# pipeline.py on a corpus of your own with GPT-2's BPE, sized for one H100 and about 12M training tokens (e.g. the
# 51 novels of a Gutenberg shelf). Sized by FLOPs for about 20 minutes (teacher 39M tokens, 9 students of 20M
# each at ~50 TFLOP/s); not yet timed on a GPU: docs/books.md says what was measured where.
# python pipeline.py config/pipeline_gpu.py --data_dir=data/books --out_dir=out-books-gpu
n_layer = 6
n_head = 8
n_embd = 512  # the teacher
block_size = 256
batch_size = 64
batch_tokens = 32768
learning_rate = 1e-3
teacher_iters = 1200  # 39M tokens
sae_layer = 2
n_concepts = 8192
sae_k = 32
sae_iters = 2000
k_attr = 4
concept_layer = 2
concept_topk = 32
student_n_embd = 256  # students narrower than the teacher, which must be clearly stronger
student_iters = 600  # 20M tokens per student
eval_interval = 50
eval_iters = 20
steer_samples = 64
steer_tokens = 100
inspect_concepts = 16
