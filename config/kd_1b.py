# The paper's 1.38B knowledge-distillation baseline, weak to strong (Tack et al. 2025, Table 1): NTP + 0.1 x
# KL(GPT-2 124M || student). NTP-1.38B's width, 2096, so that its active parameters match CoCoMix-1.38B's; 20B
# OpenWebText tokens, as Table 1 trains every row.
# torchrun --standalone --nproc_per_node=8 train.py config/kd_1b.py
# (its rows: train.py config/ntp_1b.py --max_iters=19073, train.py config/cocomix_1b.py --max_iters=19073)
out_dir = "out-kd-1b"
data_dir = "data/openwebtext"
wandb_run_name = "kd-1b"
objective = "kd"
lam_kd = 0.1
teacher = "gpt2"
n_layer = 24
n_head = 16
n_embd = 2096
block_size = 1024
batch_tokens = 1048576  # 1M
batch_size = 2  # per GPU: the teacher's logits and the fp32 KL take memory
learning_rate = 2e-4
max_iters = 19073  # 20B tokens at 1M a step
