import json
import math
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
from conftest import pseudo_text, run, train_args
from model import GPT, GPTConfig
from prepare import GPT2_BPE, Tokenizer
from test_model import hf_gpt2

GPT2 = Tokenizer({"tokenizer": "gpt2"})
NO_AUTOCAST = torch.autocast("cpu", enabled=False)

# Documents in the hub's fields, a few per task, made to exercise each convention: WikiText's markup,
# contexts longer than the model's 64 positions, trailing whitespace, HellaSwag's brackets.
DOCS = {
    "hellaswag": [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
         "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
         "ctx": "", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, "
                                "while two men supporting the head of the person wearing winter clothes snow as the "
                                "we girls sled.", ", the man puts on a christmas coat, knitted with netting.",
                                ", the man continues removing the snow on his car."],
         "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "indomain", "label": "3"},
        {"ind": 12, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny "
         "spot. [step] Tomatoes need at least six hours of sun.", "ctx_b": "you",
         "ctx": "", "endings": ["can water them [substeps] twice a day.", "should buy seeds in the winter.",
                                "will plant them in a dark cellar.", "must paint the fence blue."],
         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
    ],
    "piqa": [
        {"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide the guinea pig with a "
         "cage full of a few inches of bedding made of ripped paper strips.", "sol2": "Provide the guinea pig with a "
         "cage full of a few inches of bedding made of ripped jeans material.", "label": 0},
        {"goal": "To open a jar easily,", "sol1": "tap the lid on the counter.", "sol2": "freeze the jar overnight.",
         "label": 0},
        {"goal": "dresser", "sol1": "can hold clothes", "sol2": "can hold a house", "label": 1},
    ],
    "social_iqa": [
        {"context": "Tracy didn't go home that evening and resisted Riley's attacks.", "question": "What does Tracy "
         "need to do before this?", "answerA": "make a new plan", "answerB": "Go home and see Riley",
         "answerC": "Find somewhere to go", "label": "3"},
        {"context": "Sydney walked past a homeless woman asking for change.", "question": "How would you describe "
         "Sydney?", "answerA": "sympathetic", "answerB": "like a person who was unable to help",
         "answerC": "incredulous", "label": "1"},
    ],
    "arc_easy": [
        {"id": "Mercury_7179953", "question": "Which two body systems are directly involved in movement?",
         "choices": {"text": ["muscular and skeletal", "digestive and muscular", "skeletal and respiratory",
                              "respiratory and digestive"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "MCAS_2000_4_6", "question": "Which of these is a renewable resource?",
         "choices": {"text": ["coal", "wind", "oil"], "label": ["1", "2", "3"]}, "answerKey": "2"},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "He poured water from the bottle into the cup until the _ was empty.",
         "option1": "bottle", "option2": "cup", "answer": "1"},
    ],
}


def wiki_page(seed):
    """A WikiText-style page: headings, ' @-@ ' and ' , ' markup, and more tokens than 64 positions."""
    rng = random.Random(seed)
    words = pseudo_text(260, seed).replace(".", " .").split()
    for marker in (" @-@ ", " , ", " @,@ ", " ( ", " ) "):
        i = rng.randrange(len(words))
        words[i] += marker.strip() if marker.strip() in "()" else marker.rstrip()
    return f" = Title {seed} = \n \n " + " ".join(words) + " \n \n = = Section = = \n \n N 's \n"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 of 64 positions in a Hugging Face folder with GPT-2's BPE files, and task documents
    in eval.py's --data_files layout: the same inputs for eval.py and for the harness."""
    root = tmp_path_factory.mktemp("eval")
    folder = root / "gpt2"
    hf_gpt2(folder, 2, 2, 32, 50257, 64).save_pretrained(folder)
    shutil.copy(os.path.join(GPT2_BPE, "encoder.json"), folder / "vocab.json")
    shutil.copy(os.path.join(GPT2_BPE, "vocab.bpe"), folder / "merges.txt")
    model = GPT.from_pretrained(str(folder)).eval()
    # LAMBADA: some passages longer than the context, and one whose last word is the model's greedy choice
    docs = {**DOCS, "lambada_openai": [{"text": pseudo_text(n, seed).strip() + " unbelievably"}
                                       for n, seed in ((20, 1), (90, 2), (8, 3))]}
    for seed in range(200):
        context = pseudo_text(12, 100 + seed).strip()
        with torch.no_grad():
            top = model(torch.tensor([GPT2.encode(context)])).logits[0, -1].argmax().item()
        word = GPT2.decode([top])
        if re.fullmatch(" [A-Za-z]+", word) and GPT2.encode(context + word) == GPT2.encode(context) + [top]:
            docs["lambada_openai"].append({"text": context + word})
            break
    docs["wikitext"] = [{"page": wiki_page(s)} for s in range(2)] + [{"page": " = Short = \n Only a line . \n"}]
    data = root / "data"
    data.mkdir()
    for task, task_docs in docs.items():
        with open(data / f"{task}.jsonl", "w") as f:
            f.write("".join(json.dumps(d) + "\n" for d in task_docs))
    return folder, data


HARNESS_YAML = {"lambada_openai": "lambada/lambada_openai.yaml", "wikitext": "wikitext/wikitext.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "social_iqa": "siqa/siqa.yaml",
                "arc_easy": "arc/arc_easy.yaml", "winogrande": "winogrande/default.yaml"}


def harness_results(folder, data):
    """lm-evaluation-harness evaluating the Hugging Face folder with transformers, each task from its own
    YAML with only the dataset pointed at the local documents."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import load_yaml_config
    task_dict = {}
    for task, yaml in HARNESS_YAML.items():
        config = load_yaml_config(yaml_path=os.path.join(os.path.dirname(lm_eval.__file__), "tasks", yaml))
        split = evaluation.TASKS[task].split
        config.update(dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(data / f"{task}.jsonl")}}, training_split=None,
                      validation_split=split if split == "validation" else None,
                      test_split=split if split == "test" else None, fewshot_split=None)
        task_dict[task] = ConfigurableTask(config=config)
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1)
    return evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0)["results"]


def test_every_task_matches_the_harness(gpt2, tmp_path):
    folder, data = gpt2
    run("eval.py", f"--init_from={folder}", f"--data_files={data}", f"--out_dir={tmp_path}", "--device=cpu",
        "--batch_tokens=200")
    ours = {(r["task"], r["metric"]): r for r in json.loads((tmp_path / "eval.json").read_text())}
    theirs = harness_results(folder, data)
    assert {task for task, _ in ours} == set(evaluation.TASKS) and {t for t in theirs} == set(evaluation.TASKS)
    for (task, metric), row in ours.items():
        assert row["n"] == len((data / f"{task}.jsonl").read_text().splitlines())
        assert row["value"] == pytest.approx(theirs[task][f"{metric},none"], rel=1e-4, abs=1e-6), (task, metric)
    # the documents reach the conventions that matter: a greedy LAMBADA word, a wrong and a right choice
    assert ours["lambada_openai", "acc"]["value"] == 0.25
    assert 0 < ours["piqa", "acc"]["value"] < 1 or 0 < ours["winogrande", "acc"]["value"] < 1


def test_the_stderr_of_a_mean_is_the_harness_formula():
    from lm_eval.api.metrics import mean_stderr
    items = [1.0, 0.0, 0.0, 1.0, 1.0]
    assert evaluation.aggregate("acc", items)[1] == pytest.approx(mean_stderr(items))


def test_whitespace_moves_onto_the_continuation_and_words_split_as_in_text():
    req = evaluation.Requests(GPT2, 64)
    tokens, n = req.pair("Question: is it?\nAnswer: ", "yes")
    assert tokens == GPT2.encode("Question: is it?\nAnswer: yes") and tokens[-n:] == GPT2.encode(" yes")
    # a last word of several tokens, all of them scored
    tokens, n = req.pair("She opened the", " drawbridge")
    assert n == len(GPT2.encode(" drawbridge")) >= 2 and tokens == GPT2.encode("She opened the drawbridge")
    assert req.pair("", "Hello") == ([GPT2.eot] + GPT2.encode("Hello"), 1)


def test_acc_norm_divides_by_characters():
    req = evaluation.Requests(GPT2, 64)
    requests, items = evaluation.multiple_choice(req, "Pick:", ["a", "abcdefgh"], gold=1)
    # per token the second choice is far more likely; by characters too: -12 / 8 > -10 / 1
    assert items([(-10.0, False), (-12.0, False)]) == {"acc": 0.0, "acc_norm": 1.0}
    assert [tokens[-n:] for tokens, n in requests] == [GPT2.encode(" a"), GPT2.encode(" abcdefgh")]


def test_winogrande_scores_the_shared_suffix_under_each_option():
    req = evaluation.Requests(GPT2, 64)
    doc = DOCS["winogrande"][0]
    requests, items = evaluation.winogrande(doc, req)
    suffix = GPT2.encode(" always got the harder cases.")
    assert [tokens[-n:] for tokens, n in requests] == [suffix, suffix]
    assert [GPT2.decode(tokens[:-n]) for tokens, n in requests] == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert items([(-5.0, False), (-4.0, False)]) == {"acc": 0.0}


class Chars:
    """A tokenizer of one id per character, with an end-of-text id: windows easy to write by hand."""
    eot = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_rolling_windows_over_a_page_longer_than_the_context():
    windows = evaluation.Requests(Chars(), 4).rolling("abcdefghij")
    a = ord("a")
    assert windows == [([0, a, a + 1, a + 2, a + 3], 4),
                       ([a + 3, a + 4, a + 5, a + 6, a + 7], 4),
                       ([a + 5, a + 6, a + 7, a + 8, a + 9], 2)]
    # every token is predicted exactly once
    assert sum(n for _, n in windows) == 10
    # the harness's own windows, for many lengths and contexts
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for L in (1, 3, 8):
        for length in range(1, 30):
            tokens = list(range(1, length + 1))
            theirs = [(a + b, len(b)) for a, b in map(make_disjoint_window, get_rolling_token_windows(tokens, 0, L, 1))]
            assert evaluation.Requests(Chars(), L).rolling("".join(map(chr, tokens))) == theirs


def test_wikitext_counts_words_and_bytes_on_the_raw_page():
    page = " = Café = \n The A @-@ 1 road , built in 1 @,@ 000 . \n"
    requests, items = evaluation.wikitext({"page": page}, evaluation.Requests(GPT2, 64))
    detokenized = evaluation.wikitext_detokenize(page)
    assert detokenized == " = Café =\nThe A-1 road, built in 1,000.\n"
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
    assert all(evaluation.wikitext_detokenize(p) == wikitext_detokenizer({"page": p}) for p in (page, wiki_page(0)))
    assert GPT2.encode(detokenized) == requests[0][0][1:]
    # 17 words on the raw page: '', '=', 'Café', '=', 'The', 'A', '@-@', '1', 'road', ',', 'built', 'in', '1', '@,@',
    # '000', '.', ''
    n_bytes = len(page) + 1
    assert len(page.encode("utf-8")) == n_bytes
    assert items([(-3.0, False)]) == {"word_perplexity": (-3.0, 17), "byte_perplexity": (-3.0, n_bytes),
                                      "bits_per_byte": (-3.0, n_bytes)}
    assert evaluation.aggregate("bits_per_byte", [(-3.0, 15), (-5.0, 5)]) == (8 / 20 / math.log(2), None)


def cached_loglikelihood(model, tokens, n):
    """The last n tokens' log-likelihood from generate's path: the KV cache fed one token at a time."""
    cache, total = model.new_cache(), 0.0
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            logits = model(torch.tensor([[tokens[t]]]), cache=cache).logits[0, -1]
            if t >= len(tokens) - 1 - n:
                total += logits.log_softmax(-1)[tokens[t + 1]].item()
    return total


@pytest.mark.parametrize("slot", [dict(n_concepts=64, concept_topk=4, mixing="interleave"),
                                  dict(n_concepts=64, concept_topk=4, mixing="residual_slot"),
                                  dict(n_concepts=64, concept_topk=4, mixing="add"),
                                  dict(pause=True), dict(hidden_size=16)])
def test_a_model_with_a_slot_is_scored_as_it_generates(slot):
    torch.manual_seed(0)
    config = dict(n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=50, bias=True)
    model = GPT(GPTConfig(**config, concept_layer=1, **slot)).eval()
    # a trained model's concepts (or pause vector), not an initialisation's near-zero ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("concepts.", "pause")):
                p.normal_(std=0.3)
    plain = GPT(GPTConfig(**config)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, 50, (length,), generator=g).tolist(), n) for length, n in ((20, 5), (9, 1), (24, 23))]
    scores = evaluation.loglikelihoods(model, requests, NO_AUTOCAST, batch_tokens=40)
    for (tokens, n), (ll, _) in zip(requests, scores):
        assert ll == pytest.approx(cached_loglikelihood(model, tokens, n), abs=1e-4)
    # the concept path changes the scores: the same weights without it score otherwise
    without = evaluation.loglikelihoods(plain, requests, NO_AUTOCAST, batch_tokens=40)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(scores, without))
    # greedy: the continuation that generate picks is the argmax at every token
    prompt = torch.tensor([requests[0][0][:6]])
    greedy = model.generate(prompt, 5, temperature=0)[0].tolist()
    assert evaluation.loglikelihoods(model, [(greedy, 5)], NO_AUTOCAST, 40)[0][1]
    assert not evaluation.loglikelihoods(model, [(greedy[:-1] + [(greedy[-1] + 1) % 50], 5)], NO_AUTOCAST, 40)[0][1]


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_train") / "out"
    run("train.py", *train_args(char_data, out, max_iters=8, eval_interval=4, eval_tasks="val"))
    return out


def test_val_is_the_mean_window_loss_of_val_bin(trained, char_data):
    run("eval.py", f"--out_dir={trained}", "--device=cpu")
    rows = {r["metric"]: r for r in json.loads((trained / "eval.json").read_text())}
    model = GPT.load(str(trained)).eval()
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16).astype(np.int64)
    L = model.config.block_size
    losses = []
    with torch.no_grad():
        for i in range(len(val) // L):
            window = torch.from_numpy(val[i * L:(i + 1) * L])
            losses.append(F.cross_entropy(model(window[None, :-1]).logits[0], window[1:]).item())
    assert rows["loss"]["n"] == len(losses) and rows["loss"]["step"] == 8 and rows["loss"]["tokens"] == 8 * 256
    assert rows["loss"]["value"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert rows["perplexity"]["value"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    # train.py logged the same task at each evaluation, the last one on these weights
    logged = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val_logs = [m for m in logged if "eval_val_perplexity" in m]
    assert [m["step"] for m in val_logs] == [0, 4, 8]
    assert val_logs[-1]["eval_val_perplexity"] == pytest.approx(rows["perplexity"]["value"], rel=1e-5)


def test_two_models_side_by_side(trained, char_data, tmp_path):
    proc = run("eval.py", f"--out_dir={trained}", f"--out_dir2={trained}", "--tasks=val", "--limit=3", "--device=cpu")
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| task"))
    assert header == f"| task | metric | {trained} | {trained} | difference |"
    assert "| val | loss |" in proc.stdout and proc.stdout.count("+0.0000 |") == 2


@pytest.mark.parametrize("args, message", [
    (["--tasks=val,squad"], "unknown task squad"),
    (["--tasks=hellaswag"], "hellaswag is English text for GPT-2's tokenizer"),
    (["--tasks=val", "--data_dir=/no/such/data"], "no prepared data in /no/such/data"),
])
def test_bad_input(trained, args, message):
    proc = run("eval.py", f"--out_dir={trained}", "--device=cpu", *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_and_malformed_documents(gpt2, tmp_path):
    folder, _ = gpt2
    args = [f"--init_from={folder}", f"--out_dir={tmp_path}", "--device=cpu", f"--data_files={tmp_path}"]
    proc = run("eval.py", *args, "--tasks=piqa", check=False)
    assert proc.returncode == 1 and f"cannot read piqa's documents from {tmp_path}/piqa.jsonl" in proc.stderr
    (tmp_path / "piqa.jsonl").write_text(json.dumps({"goal": "x", "sol1": "a", "label": 0}) + "\n")
    proc = run("eval.py", *args, "--tasks=piqa", check=False)
    assert proc.returncode == 1 and "piqa document 0 lacks sol2" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_without_local_files_names_the_dataset(gpt2, tmp_path):
    folder, _ = gpt2
    proc = run("eval.py", f"--init_from={folder}", "--tasks=arc_easy", f"--out_dir={tmp_path}", "--device=cpu",
               env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot load arc_easy (allenai/ai2_arc, ARC-Easy, split test)" in proc.stderr
    assert "--data_files" in proc.stderr
    assert not os.path.exists(tmp_path / "eval.json")


def test_val_needs_a_corpus_and_eval_json_must_be_ours(gpt2, trained, tmp_path):
    folder, _ = gpt2
    proc = run("eval.py", f"--init_from={folder}", "--tasks=val", f"--out_dir={tmp_path}", "--device=cpu", check=False)
    assert proc.returncode == 1 and "has no corpus of its own; give --data_dir" in proc.stderr
    # a train.py model scored into a folder whose eval.json is something else
    (tmp_path / "eval.json").write_text("{not json")
    proc = run("eval.py", f"--init_from={trained}", "--tasks=val", "--limit=2", f"--out_dir={tmp_path}",
               "--device=cpu", check=False)
    assert proc.returncode == 1 and "is not a results file of eval.py" in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_that_is_not_a_model(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(os.urandom(300))
    proc = run("eval.py", f"--out_dir={tmp_path}", "--tasks=val", check=False)
    assert proc.returncode == 1 and "not a readable checkpoint" in proc.stderr and "Traceback" not in proc.stderr
