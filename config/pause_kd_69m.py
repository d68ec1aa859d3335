# The paper's 69M pause + KD baseline (Tack et al. 2025, Fig. 6f): config/pause_69m.py trained with
# NTP + 0.1 x KL(GPT-2 124M || student). Width 624, as NTP-69M, to match CoCoMix-69M's active parameters.
# torchrun --standalone --nproc_per_node=8 train.py config/pause_kd_69m.py
out_dir = "out-pause-kd-69m"
data_dir = "data/openwebtext"
wandb_run_name = "pause-kd-69m"
objective = "pause_kd"
lam_kd = 0.1
teacher = "gpt2"
concept_layer = 3
n_layer = 8
n_head = 8
n_embd = 624
block_size = 1024
batch_tokens = 524288  # 0.5M
batch_size = 8  # per GPU: 2T positions above block 3, and the teacher's logits
learning_rate = 6e-4
max_iters = 38147  # 20B tokens at 0.5M a step
