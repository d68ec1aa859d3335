"""
The built-in corpus: its world, its generator, the prompts that steering starts from, and the
measurements it allows because its structure is known. `python prepare.py topics` writes it.

Topics with their own words over shared function words and grammar. A topic holds for a paragraph
and changes between paragraphs with probability `switch`; each document introduces one of N_NAMES
made-up names and every paragraph opens with it (a dependency beyond the local words). Its tokens
are words: the structure is learnt in minutes on a CPU, and so is steering's effect.
"""

import re

import numpy as np

TOPICS = {
    "sea": "ship sail wave harbor anchor sailor island tide shore captain deck mast reef gull current "
           "lighthouse sailed rowed anchored swam dove floated steered capsized salty stormy deep coastal tidal "
           "foamy briny nautical",
    "farm": "cow barn field tractor farmer wheat plow hay pig orchard harvest fence goat seed meadow silo "
            "planted harvested plowed milked fed herded sowed watered rural muddy golden ripe fertile dusty "
            "rustic pastoral",
    "war": "soldier army sword battle general cannon fort shield rifle siege troop banner enemy trench helmet "
           "spear marched attacked defended fought charged surrendered besieged fired brave bloody armored "
           "fierce loyal wounded defeated victorious",
    "kitchen": "bread oven soup cook pan knife butter flour spoon kettle stove onion pepper cheese dough recipe "
               "baked stirred boiled chopped fried tasted roasted seasoned spicy warm crispy sweet savory fresh "
               "tender hot",
    "music": "song piano violin drum singer choir melody guitar concert chord rhythm flute stage band tune harp "
             "played sang tuned strummed composed hummed performed rehearsed loud gentle melodic harmonic lively "
             "soft rhythmic musical",
    "space": "star planet rocket moon comet orbit galaxy astronaut telescope crater nebula satellite asteroid "
             "launch gravity cosmos launched orbited landed observed explored docked measured zoomed distant "
             "lunar cosmic stellar dark silent orbital vast",
    "forest": "tree oak pine moss fern deer owl wolf trail branch leaf root bark bear mushroom stream climbed "
              "wandered hunted gathered hid foraged howled rustled wild shady ancient leafy mossy dense quiet "
              "wooded",
    "medicine": "doctor nurse patient fever pill wound clinic surgeon bandage cure illness needle remedy pulse "
                "ward medicine healed treated examined diagnosed bandaged prescribed recovered injected sick "
                "healthy feverish pale sterile medical weak painful",
}
TOPIC_WORDS = {t: ws.split() for t, ws in TOPICS.items()}
# in each topic: 16 nouns, 8 verbs, 8 adjectives
SLOTS = {"N": slice(0, 16), "V": slice(16, 24), "A": slice(24, 32)}
# N noun, V verb, A adjective, E the document's name
TEMPLATES = [
    "the A N V the N.", "a N V with the A N.", "then the N V and the N V.", "E saw that the N was A.",
    "in the A N, E V.", "E V near the N.", "the N was A, and the N was A.", "after the N, the A N V.",
    "E and the N V by the A N.", "it was a A N, so E V.", "there the N V over the N.", "E knew the N of the N.",
]
# a paragraph's first sentence names the document's entity
NAMED = [t for t in TEMPLATES if "E" in t.split()]
# how every document starts: the neutral prompt of the steering measurement
INTRO = "this is the tale of E.\n"
# the topic of characters outside a paragraph
NO_TOPIC = 255
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
N_NAMES = 64


def make_name(rng):
    return "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))).capitalize()


def topic_corpus(n_chars, seed, switch=0.2):
    """Text of about n_chars characters, each character's topic id (NO_TOPIC outside paragraphs), and
    the names the documents use."""
    rng = np.random.default_rng(seed)
    topics = list(TOPIC_WORDS)
    names = []
    while len(names) < N_NAMES:
        name = make_name(rng)
        if name not in names:
            names.append(name)
    parts, labels, size = [], [], 0

    def emit(text, topic):
        nonlocal size
        parts.append(text)
        labels.append(np.full(len(text), topic, dtype=np.uint8))
        size += len(text)

    while size < n_chars:
        name = rng.choice(names)
        emit(INTRO.replace("E", name), NO_TOPIC)
        topic = rng.integers(len(topics))
        for _ in range(rng.integers(2, 5)):
            if rng.random() < switch:
                topic = (topic + rng.integers(1, len(topics))) % len(topics)
            vocab = TOPIC_WORDS[topics[topic]]
            sentences = []
            for i in range(rng.integers(3, 6)):
                tokens = []
                for tok in rng.choice(TEMPLATES if i else NAMED).split(" "):
                    word, tail = tok.rstrip(".,"), tok[len(tok.rstrip(".,")):]
                    pick = SLOTS.get(word)
                    word = name if word == "E" else rng.choice(vocab[pick]) if pick else word
                    tokens.append(word + tail)
                sentences.append(" ".join(tokens))
            emit(" ".join(sentences), topic)
            emit("\n", NO_TOPIC)
        emit("\n", NO_TOPIC)
    return "".join(parts), np.concatenate(labels), names


def source(corpus_chars, corpus_seed, val_fraction):
    """The meta "source" of the built-in corpus: the settings it is a function of."""
    return {"corpus": "topics", "corpus_chars": corpus_chars, "corpus_seed": corpus_seed, "val_fraction": val_fraction}


def prompts(names, n):
    """n neutral prompts, the start of a document, cycling through the given names."""
    return [INTRO.replace("E", names[i % len(names)]) for i in range(n)]


def words(text):
    """The lower-case words of a text: the names are not counted."""
    return re.findall(r"\b[a-z]+\b", text)


def topic_rate(texts, topic_words):
    """The share of the words in `texts` that are in `topic_words`."""
    found = [w for t in texts for w in words(t)]
    return sum(w in topic_words for w in found) / max(1, len(found))


def topic_features(features, tokens, topic, n_topics, block_size, device):
    """For each planted topic, the feature (a column of `features(x)`, e.g. concept logits) that
    correlates most (Pearson, over the positions of validation paragraphs) with the indicator of
    that topic: [(feature, correlation)], (None, None) for a topic absent from the text."""
    # imported here: prepare.py imports this module, and needs no torch
    import torch
    starts = np.arange(0, len(tokens) - block_size + 1, block_size)
    z, t = [], []
    for batch in np.array_split(starts, (len(starts) + 15) // 16):
        x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in batch]).astype(np.int64)).to(device)
        with torch.no_grad():
            z.append(features(x).float().flatten(0, 1).cpu())
        t.append(torch.from_numpy(np.stack([topic[s:s + block_size] for s in batch]).astype(np.int64)).flatten())
    z, t = torch.cat(z), torch.cat(t)
    z, t = z[t != NO_TOPIC], t[t != NO_TOPIC]
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-8)
    result = []
    for k in range(n_topics):
        ind = (t == k).float()
        if ind.sum() == 0:
            result.append((None, None))
            continue
        corr = (z * ((ind - ind.mean()) / ind.std().clamp_min(1e-8))[:, None]).sum(0) / (len(ind) - 1)
        result.append((int(corr.argmax()), float(corr.max())))
    return result
