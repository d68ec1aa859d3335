# A tiny character-level GPT that trains in about a minute on a laptop CPU.
# Data: python prepare.py text --input "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/*.py" \
#     --data_dir=data/tiny --tokenizer=char
out_dir = "out-tiny"
data_dir = "data/tiny"
block_size = 128
batch_size = 16
batch_tokens = 16 * 128
n_layer = 4
n_head = 4
n_embd = 128
learning_rate = 2e-3
max_iters = 300
eval_interval = 100
eval_iters = 20
log_interval = 50
compile = False
