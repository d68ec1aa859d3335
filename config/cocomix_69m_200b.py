# The paper's CoCoMix-69M at its main budget (Tack et al. 2025, Fig. 3 and Fig. 7): config/cocomix_69m.py on
# 200B OpenWebText tokens (382K steps) instead of 20B. Its NTP twin is config/ntp_69m_200b.py.
# torchrun --standalone --nproc_per_node=8 train.py config/cocomix_69m_200b.py
out_dir = "out-cocomix-69m-200b"
data_dir = "data/openwebtext"
wandb_run_name = "cocomix-69m-200b"
objective = "cocomix"
n_layer = 8
n_head = 8
n_embd = 512
block_size = 1024
n_concepts = 32768
concept_topk = 32
concept_layer = 3
mixing = "interleave"
lam_concept = 0.1
k_attr = 4
teacher = "gpt2"
sae = "openai"
sae_layer = 5
batch_tokens = 524288  # 0.5M
batch_size = 16  # per GPU
learning_rate = 6e-4
max_iters = 381470  # 200B tokens at 0.5M a step
