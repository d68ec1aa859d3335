# The paper's 69M knowledge-distillation baseline (Tack et al. 2025, §3 and App. A): NTP + 0.1 x
# KL(GPT-2 124M || student) over the next-token distributions. Its width is NTP-69M's, 624, so that its
# active parameters match CoCoMix-69M's (the teacher is frozen and not counted). OpenWebText, 20B tokens.
# torchrun --standalone --nproc_per_node=8 train.py config/kd_69m.py
out_dir = "out-kd-69m"
data_dir = "data/openwebtext"
wandb_run_name = "kd-69m"
objective = "kd"
lam_kd = 0.1
teacher = "gpt2"
n_layer = 8
n_head = 8
n_embd = 624
block_size = 1024
batch_tokens = 524288  # 0.5M
batch_size = 16  # per GPU: the teacher's logits and the fp32 KL take memory
learning_rate = 6e-4
max_iters = 38147  # 20B tokens at 0.5M a step
