# A TopK SAE on the middle of the tiny teacher (config/tiny.py: 4 blocks of width 128), a few minutes on a CPU.
# python train_sae.py config/sae_tiny.py
teacher = "out-tiny"
sae_layer = 1
data_dir = "data/tiny"
out_dir = "out-sae-tiny"
n_concepts = 1024
sae_k = 16
k_aux = 64
dead_tokens = 200_000
block_size = 128
batch_size = 32
max_iters = 1000
learning_rate = 1e-3
eval_interval = 250
