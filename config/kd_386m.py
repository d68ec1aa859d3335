# The paper's 386M knowledge-distillation baseline, weak to strong (Tack et al. 2025, Table 1 and Fig. 4a-b):
# NTP + 0.1 x KL(GPT-2 124M || student), the teacher smaller than the student. NTP-386M's width, 1072, so
# that its active parameters match CoCoMix-386M's; 20B OpenWebText tokens, as Table 1 trains every row.
# torchrun --standalone --nproc_per_node=8 train.py config/kd_386m.py
# (its rows: train.py config/ntp_386m.py --max_iters=38147, train.py config/cocomix_386m.py --max_iters=38147)
out_dir = "out-kd-386m"
data_dir = "data/openwebtext"
wandb_run_name = "kd-386m"
objective = "kd"
lam_kd = 0.1
teacher = "gpt2"
n_layer = 24
n_head = 16
n_embd = 1072
block_size = 1024
batch_tokens = 524288  # 0.5M
batch_size = 8  # per GPU: the teacher's logits and the fp32 KL take memory
learning_rate = 3e-4
max_iters = 38147  # 20B tokens at 0.5M a step
