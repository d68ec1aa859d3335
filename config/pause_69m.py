# The paper's 69M pause-token baseline (Tack et al. 2025, Fig. 6f): one learned vector interleaved after
# every token before block 3, where CoCoMix-69M interleaves its concepts (the same 2T layout and readout).
# Width: as the paper matches active parameters by widening the baselines, NTP-69M's 624; the pause
# vector adds 624 parameters. OpenWebText, 20B tokens.
# torchrun --standalone --nproc_per_node=8 train.py config/pause_69m.py
out_dir = "out-pause-69m"
data_dir = "data/openwebtext"
wandb_run_name = "pause-69m"
objective = "pause"
concept_layer = 3
n_layer = 8
n_head = 8
n_embd = 624
block_size = 1024
batch_tokens = 524288  # 0.5M
batch_size = 16  # per GPU: the upper blocks run on 2T positions
learning_rate = 6e-4
max_iters = 38147  # 20B tokens at 0.5M a step
