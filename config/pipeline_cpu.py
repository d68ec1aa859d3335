# pipeline.py on a corpus of your own with GPT-2's BPE, sized for a 2-core CPU and about 1.5M training tokens
# (e.g. nine novels). Measured on nine novels: about 2 h with 3 seeds (teacher 17 min, labels 14 min, each pair
# of students 10 min), 91 min with --seeds=2. The vocabulary's 50,257-way head dominates every stage here.
# python pipeline.py config/pipeline_cpu.py --data_dir=data/books --out_dir=out-books
n_layer = 4
n_head = 4
n_embd = 128  # the teacher
block_size = 128
batch_size = 16
batch_tokens = 2048
learning_rate = 2e-3
teacher_iters = 600  # 1.2M tokens
sae_layer = 1
n_concepts = 2048
sae_k = 16
sae_iters = 300
k_attr = 4
concept_layer = 2
concept_topk = 16
student_n_embd = 96  # students narrower than the teacher, which must be clearly stronger
student_iters = 200  # 410k tokens per student
eval_interval = 20
steer_samples = 16
steer_tokens = 50
inspect_concepts = 16
