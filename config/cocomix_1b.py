# The paper's CoCoMix-1.38B (Tack et al. 2025, App. A; its width 2028 is a typo for 2048): concepts from
# OpenAI's 32k SAE on GPT-2 124M's block 5, predicted and interleaved before block 5. Its NTP twin is
# config/ntp_1b.py (width 2096).
# OpenWebText, 200B tokens. torchrun --standalone --nproc_per_node=8 train.py config/cocomix_1b.py
out_dir = "out-cocomix-1b"
data_dir = "data/openwebtext"
wandb_run_name = "cocomix-1b"
objective = "cocomix"
n_layer = 24
n_head = 16
n_embd = 2048
block_size = 1024
n_concepts = 32768
concept_topk = 32
concept_layer = 5
mixing = "interleave"
lam_concept = 0.1
k_attr = 4
teacher = "gpt2"
sae = "openai"
sae_layer = 5
batch_tokens = 1048576  # 1M
batch_size = 4  # per GPU
learning_rate = 2e-4
max_iters = 190735  # 200B tokens at 1M a step
