# The paper's 69M NTP baseline at its main budget (Tack et al. 2025, Fig. 3 and Fig. 7): config/ntp_69m.py on
# 200B OpenWebText tokens (382K steps) instead of 20B. Its CoCoMix twin is config/cocomix_69m_200b.py.
# torchrun --standalone --nproc_per_node=8 train.py config/ntp_69m_200b.py
out_dir = "out-ntp-69m-200b"
data_dir = "data/openwebtext"
wandb_run_name = "ntp-69m-200b"
n_layer = 8
n_head = 8
n_embd = 624
block_size = 1024
batch_tokens = 524288  # 0.5M
batch_size = 32  # per GPU: 8 GPUs x 2 accumulation steps
learning_rate = 6e-4
max_iters = 381470  # 200B tokens at 0.5M a step
