# The paper's distribution shift (Tack et al. 2025, Fig. 4c): CoCoMix-386M trained on OpenWebMath, a corpus of
# mathematical web pages, with the concepts of GPT-2 124M and OpenAI's SAE, both made on OpenWebText. The paper
# names no size or budget for it: 386M as the rest of its Fig. 4, 20B tokens as its other studies (OpenWebMath
# is about 14.7B tokens: 1.4 passes).
# python prepare.py openwebmath
# torchrun --standalone --nproc_per_node=8 train.py config/cocomix_386m_owm.py
# (its rows: train.py config/ntp_386m.py --data_dir=data/openwebmath --max_iters=38147 --out_dir=out-ntp-386m-owm,
#  train.py config/kd_386m.py --data_dir=data/openwebmath --out_dir=out-kd-386m-owm)
out_dir = "out-cocomix-386m-owm"
data_dir = "data/openwebmath"
wandb_run_name = "cocomix-386m-owm"
objective = "cocomix"
n_layer = 24
n_head = 16
n_embd = 1024
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
batch_tokens = 524288  # 0.5M
batch_size = 8  # per GPU
learning_rate = 3e-4
max_iters = 38147  # 20B tokens at 0.5M a step
