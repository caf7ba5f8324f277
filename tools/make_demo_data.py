#!/usr/bin/env python3
"""make_demo_data.py - generate klspeech's small synthetic demo data sets.

Everything here is SYNTHETIC speech (espeak-ng and flite text-to-speech), not recordings of
people. It is meant for demos, tests and quick experiments of the fine-tuning recipes (keyword
spotting with SUPERB's 12 classes, low-resource CTC ASR) and of KL-Norm on in-domain vs
out-of-domain test sets. See docs/DATA.md for what the data can and cannot show.

Usage (from the repository root):

    nice -n 10 python3 tools/make_demo_data.py [--out audio_fixtures] [--seed 0] [--jobs 2]
        Deletes and rewrites OUT/kws/ and OUT/asr/ (nothing else under OUT), then reads every
        written file back, checks it (format, length, not silent, not clipped) and prints a
        summary table (clips per split and class, minutes of audio and of speech, sizes). The
        committed data is exactly the output of this command with the defaults (about one
        minute on two cores; 1078 files, about 22 MB).

    nice -n 10 python3 tools/make_demo_data.py --pretrain-corpus DIR --minutes N [--seed 0]
        Instead, writes a larger multi-speaker corpus for pre-training (NOT committed):
        DIR/train.csv (`path,sentence`, paths relative to DIR), DIR/clips/*.flac and
        DIR/speakers.csv. N minutes of espeak-ng speakers reading sentences made by a small
        random grammar. Its speakers are a pool of their own: only (accent, variant) pairs of
        the training role, with (rate, pitch) combinations no demo speaker uses, so no dev or
        test speaker of OUT/kws or OUT/asr (nor any of their accent+variant pairs) is in it.
        No utterance is a lone keyword and no sentence equals a demo ASR sentence. Writes only
        DIR/clips/, DIR/train.csv and DIR/speakers.csv (replacing them).

Needs: python3 (standard library only), espeak-ng, flite (voices slt rms awb kal16 kal), sox
with FLAC support (Debian/Ubuntu: apt-get install espeak-ng flite sox libsox-fmt-all).

Output format: every clip is 16 kHz mono 16-bit FLAC. Output is deterministic for a given seed
and tool versions: all randomness comes from random.Random(seeded strings), work is done in
sorted orders, sox runs without dither (-D) and in repeatable mode (-R).

Layout written under OUT (see docs/DATA.md for the speaker pools and counts):

    kws/train/            Speech Commands training layout: <word>/<spk8hex>_nohash_<n>.flac for
                          the 10 keywords and 20 unknown words, validation_list.txt (dev
                          speakers), testing_list.txt (in-domain test speakers),
                          _background_noise_/*.flac (12 s noise recordings).
    kws/speakers.csv      every KWS speaker: 8-hex hash, role, synthesizer settings.
    kws/test-ood/         official test layout (a folder per label incl. _unknown_, _silence_):
                          flite voices (a different synthesizer, never in training).
    kws/test-noisy/       official test layout: the in-domain test clips with held-out noise
                          mixed in at 10 dB SNR, and _silence_ clips of that noise.
    asr/train.csv, dev.csv, test.csv, test-ood.csv   `path,sentence` manifests (paths relative
                          to the manifest), asr/clips/<split>-<spk8hex>-<n>.flac,
                          asr/speakers.csv.
"""

import argparse
import array
import csv
import hashlib
import io
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import wave
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

RATE = 16000

# --- the label set (SUPERB keyword spotting) ------------------------------------------------
KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
UNKNOWN_WORDS = ["bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
                 "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero"]
UNKNOWN = "_unknown_"
SILENCE = "_silence_"

# --- in-domain speakers: espeak-ng ----------------------------------------------------------
# A speaker is one fixed (accent voice, variant, rate in wpm, pitch 0-99) combination.
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
RATES = [130, 145, 160, 175, 190]
PITCHES = [30, 40, 50, 60, 70]
# (accent, variant) pairs are split into roles: the test pairs cover every accent (at most 2
# pairs per accent) and every variant once; dev likewise (10 of 12 variants); all other pairs
# are "train" pairs.
N_TEST_PAIRS, N_DEV_PAIRS = 12, 10

# --- out-of-domain speakers: flite (a different synthesizer) ---------------------------------
# (voice, duration_stretch, int_f0_target_mean or None). kal is an 8 kHz voice (upsampled).
# rms ignores int_f0_target_mean, so its second speaker differs by speaking rate only.
FLITE_SPEAKERS = [
    ("slt", None, None), ("slt", 1.15, 210),
    ("rms", None, None), ("rms", 0.9, None),
    ("awb", None, None), ("awb", 1.1, 125),
    ("kal16", None, None), ("kal16", 0.92, 130),
    ("kal", None, None), ("kal", 1.12, 95),
]

# --- sizes of the committed data ---------------------------------------------------------------
KWS_TRAIN_SPEAKERS, KWS_DEV_SPEAKERS, KWS_TEST_SPEAKERS = 24, 6, 8
UNKNOWN_PER_SPEAKER = {"train": 2, "dev": 2, "test": 3, "ood": 3}
NOISE_SECONDS = 12.0            # each _background_noise_ recording
OOD_SILENCE_CLIPS = 10          # test-ood/_silence_ (one per flite speaker, like a word class)
NOISY_SILENCE_CLIPS = 8         # test-noisy/_silence_ (one per in-domain test speaker)
NOISY_SNR_DB = 10.0
ASR_TRAIN_SPEAKERS, ASR_DEV_SPEAKERS, ASR_TEST_SPEAKERS = 24, 5, 6
ASR_TRAIN_MINUTES = 10.5        # stop adding training utterances once this much audio exists
ASR_EVAL_UTTERANCES = {"dev": 20, "test": 30, "test-ood": 20}
ASR_UNSEEN_FRACTION = 0.25      # of each eval split's utterances: sentences never in train
ASR_N_HELDOUT = 30              # sentences of SENTENCES never used in train
SIZE_BUDGET_BYTES = 25 * 1000 * 1000

KWS_MAX_SPEECH_S = 0.88         # longer words are sped up (sox tempo) to this length

# 150 short sentences (4-9 words, lowercase letters, spaces, apostrophes). Some are held out of
# training (chosen by the script so that their words occur in the training sentences).
SENTENCES = """
the cat sat on the warm mat
my brother likes to read old books
we walked to the park after lunch
she left her red bag on the bus
the dog is sleeping under the table
please close the door when you leave
it's raining again this morning
he bought fresh bread at the market
the children played in the garden all day
i don't like cold coffee
turn off the light before bed
the water in the lake is very cold
can you help me carry this box
they watched a long film last night
the old man sat by the window
my sister works at the small shop
we need more milk and some eggs
the bird sang in the tall tree
put the green cup on the shelf
the train was late again today
she painted the kitchen a bright yellow
i'm going home after work
the baby is laughing at the dog
let's meet at the station at noon
he can't find his keys anywhere
the sun is shining over the hills
we had soup and bread for dinner
the teacher wrote a word on the board
you should drink more water every day
the wind blew the leaves across the road
my friend lives in a big city
the shop opens early on monday
she's reading a letter from her mother
the car stopped at the red light
we could hear the sea from our room
i left my phone in the kitchen
the boy kicked the ball over the wall
they're building a new school near the river
please write your name on the paper
the cake smells sweet and warm
he walked slowly down the long road
the cat is hiding behind the chair
we're going to the beach on sunday
my father cooks dinner every friday
the flowers in the garden are blue
she opened the window to let in air
the river runs past the old mill
i need a new pair of shoes
the dog ran across the green field
they sold their house last summer
the room was dark and quiet
he plays the piano in the evening
the girl found a small white stone
we waited for the bus in the rain
that's the best soup i've ever had
the farmer keeps sheep on the hill
can you open the door for me
the market is busy on saturday
she carried the basket to the car
my mother likes tea with honey
the clock on the wall is slow
we played cards by the fire
the boat moved slowly across the lake
he didn't see the sign on the road
the moon is bright tonight
put your coat on the chair
the snow covered the whole town
i heard a bird outside my window
they ate lunch under a big tree
the small dog barked at the cat
you're late for school again
the old bridge crosses the river
she keeps her books on a shelf
we bought apples at the market
the kitchen smells of fresh bread
he wrote a long letter to his friend
the lights in the city are bright
my brother can swim very fast
the children sang a song at school
it's too cold to play outside
the man in the shop was kind
we saw a film about the sea
the horse ran across the field
please put the milk in the fridge
the wind is strong near the sea
i found my keys in my coat
the garden is full of yellow flowers
she drinks coffee every morning
they walked home along the river
the door to the kitchen is open
he gave his sister a red apple
the bus stops near our house
we cleaned the whole house on sunday
the teacher read a story to the children
my father works in a big office
the rain stopped after an hour
she found a cat in the garden
the bread is on the kitchen table
let's go for a walk by the lake
the phone rang in the middle of the night
i like the smell of fresh coffee
the fire kept the room warm
they're playing football in the park
the shop on the corner sells fresh fish
he left the window open all night
the little girl has a blue dress
we drove to the city on monday
the old dog sleeps by the fire
my friend gave me a book about birds
the water is too hot to drink
she can't find her blue coat
the students sat quietly in the room
we heard the train in the night
the tree in our garden is very old
put the books back on the shelf
the sky was dark before the storm
he runs in the park every morning
the soup is too hot to eat
my sister found a job in the city
the boy is reading under the tree
they painted the door bright red
the cat drank the milk from the cup
we sat on the bridge and watched the boats
i'm making tea for my mother
the fish swam under the old boat
she walked her dog along the beach
the school is closed on sunday
he found an old coin in the garden
the light in the kitchen is broken
we ate fresh fish by the sea
the farmer drove his car to the market
my friend is waiting at the station
the leaves turn yellow in the autumn
please don't leave the door open
the children ran to the beach
the teacher opened the window
i bought a warm coat for the winter
they heard a strange sound in the night
the road to the farm is long
she gave the baby a small cup of milk
the sheep are eating grass on the hill
we live in a small house by the river
he cooked eggs and bread for breakfast
the wall around the garden is very old
my mother reads the paper every morning
the boats are resting on the beach
it's warm and sunny in the garden
the man walked his dog in the rain
she left the keys on the kitchen table
we watched the sun go down over the sea
""".strip().splitlines()

# Grammar of the pre-training corpus (--pretrain-corpus): many more sentences than SENTENCES.
PT_NAMES = ["anna", "peter", "maria", "john", "lucy", "tom", "sarah", "david", "emma", "paul",
            "kate", "james", "helen", "mark", "laura", "simon", "alice", "frank", "rose", "henry"]
PT_ADJS = ["old", "new", "small", "big", "red", "blue", "green", "quiet", "busy", "warm", "cold",
           "little", "long", "dark", "bright", "clean", "heavy", "empty", "yellow", "white",
           "brown", "young", "happy", "tired", "strange", "wooden", "simple", "narrow"]
PT_NOUNS = ["cat", "dog", "car", "house", "garden", "river", "book", "letter", "window", "table",
            "chair", "road", "bridge", "market", "school", "kitchen", "boat", "train", "bus",
            "horse", "bird", "tree", "field", "shop", "city", "village", "coat", "basket", "cup",
            "box", "bottle", "picture", "song", "story", "door", "key", "phone", "lamp", "bag",
            "farm", "hill", "lake", "forest", "station", "office", "church", "hotel", "ticket"]
PT_PLACES = ["park", "market", "station", "beach", "river", "garden", "kitchen", "office",
             "school", "village", "city", "forest", "hotel", "library", "harbour", "farm"]
PT_VERBS_PAST = ["saw", "found", "bought", "painted", "cleaned", "carried", "opened", "closed",
                 "watched", "moved", "sold", "lost", "fixed", "washed", "visited", "liked",
                 "remembered", "noticed", "brought", "wanted"]
PT_VERBS = ["see", "find", "buy", "paint", "clean", "carry", "open", "close", "watch", "move",
            "sell", "fix", "wash", "visit", "bring", "need", "keep", "read"]
PT_MOTION = ["walked", "drove", "ran", "went", "came", "cycled", "hurried", "travelled"]
PT_TIMES = ["this morning", "last night", "on monday", "every day", "after lunch",
            "in the evening", "before dinner", "on sunday", "last summer", "in the winter",
            "at noon", "yesterday", "today", "again", "once more", "after work"]
PT_PRONS = ["i", "we", "they", "you", "she", "he"]
PT_MODALS = ["will", "can", "should", "must", "could", "might", "would"]
PT_TEMPLATES = [
    "the {adj} {noun} is near the {place}",
    "{name} {past} the {adj} {noun} {time}",
    "{pron} {modal} {verb} the {noun} {time}",
    "{name} and {name2} {motion} to the {place} {time}",
    "the {noun} in the {place} was {adj}",
    "{pron} {past} a {adj} {noun} at the {place}",
    "please {verb} the {adj} {noun} for {name}",
    "{name} {motion} home from the {place} {time}",
    "there is a {adj} {noun} behind the {noun2}",
    "{name} {past} the {noun} and the {noun2}",
    "{pron} {modal} not {verb} the {adj} {noun}",
    "the {noun} was {adj} and the {noun2} was {adj2}",
    "{name} gave {name2} a {adj} {noun} {time}",
    "why did {name} {verb} the {noun} {time}",
]

_print_lock = threading.Lock()
SPED_UP = []  # KWS clips that needed sox tempo (reported in the summary)


def log(msg):
    with _print_lock:
        print(msg, flush=True)


def die(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, stdin=None):
    """Runs a command, returns its stdout; any failure or stderr output aborts."""
    p = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        die(f"{' '.join(cmd)!r} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-800:]}")
    return p.stdout


# ---------------------------------------------------------------------------------------------
# speakers


class Speaker:
    """A synthetic speaker: one fixed synthesizer configuration."""

    def __init__(self, synth, voice, variant=None, rate=None, pitch=None, stretch=None, f0=None):
        self.synth, self.voice, self.variant = synth, voice, variant
        self.rate, self.pitch, self.stretch, self.f0 = rate, pitch, stretch, f0
        if synth == "espeak":
            self.id = f"espeak:{voice}+{variant}:s{rate}:p{pitch}"
        else:
            self.id = f"flite:{voice}" + (f":stretch{stretch}" if stretch else "") + (f":f0{f0}" if f0 else "")
        self.hash = hashlib.sha1(self.id.encode()).hexdigest()[:8]
        self.role = ""  # filled in by the caller, e.g. "kws-train"

    def row(self):
        return OrderedDict(speaker=self.hash, role=self.role, synth=self.synth, voice=self.voice,
                           variant=self.variant or "", rate_wpm=self.rate or "", pitch=self.pitch or "",
                           duration_stretch=self.stretch or "", f0_mean=self.f0 or "", id=self.id)


def build_pools(seed):
    """Assigns every (accent, variant) pair a role and draws the speakers of each split."""
    rng = random.Random(f"{seed}/pools")
    pairs = [(a, v) for a in ACCENTS for v in VARIANTS]
    rng.shuffle(pairs)
    role_of = {}

    def take(n, role):
        # first one pair per accent, then a second one for some accents; never a variant twice
        acc, var, chosen = Counter(), Counter(), []
        for cap in (1, 2):
            for p in pairs:
                if len(chosen) == n:
                    break
                if p in role_of or p in chosen or acc[p[0]] >= cap or var[p[1]] >= 1:
                    continue
                chosen.append(p)
                acc[p[0]] += 1
                var[p[1]] += 1
        assert len(chosen) == n, role
        for p in chosen:
            role_of[p] = role
        return chosen

    test_pairs = take(N_TEST_PAIRS, "test")
    dev_pairs = take(N_DEV_PAIRS, "dev")
    train_pairs = [p for p in pairs if p not in role_of]
    used = set()

    def speakers(pair_list, n, role):
        out = []
        for i in range(n):
            a, v = pair_list[i % len(pair_list)]
            free = [(r, p) for r in RATES for p in PITCHES if (a, v, r, p) not in used]
            r, p = rng.choice(free)
            used.add((a, v, r, p))
            s = Speaker("espeak", a, v, r, p)
            s.role = role
            out.append(s)
        return out

    pools = OrderedDict()
    pools["kws-train"] = speakers(train_pairs[:KWS_TRAIN_SPEAKERS], KWS_TRAIN_SPEAKERS, "kws-train")
    pools["kws-dev"] = speakers(dev_pairs[:KWS_DEV_SPEAKERS], KWS_DEV_SPEAKERS, "kws-dev")
    pools["kws-test"] = speakers(test_pairs[:KWS_TEST_SPEAKERS], KWS_TEST_SPEAKERS, "kws-test")
    pools["asr-train"] = speakers(train_pairs[KWS_TRAIN_SPEAKERS:KWS_TRAIN_SPEAKERS + ASR_TRAIN_SPEAKERS],
                                  ASR_TRAIN_SPEAKERS, "asr-train")
    pools["asr-dev"] = speakers(dev_pairs[KWS_DEV_SPEAKERS:] + dev_pairs, ASR_DEV_SPEAKERS, "asr-dev")
    pools["asr-test"] = speakers(test_pairs[KWS_TEST_SPEAKERS:] + test_pairs, ASR_TEST_SPEAKERS, "asr-test")
    ood = []
    for voice, stretch, f0 in FLITE_SPEAKERS:
        s = Speaker("flite", voice, stretch=stretch, f0=f0)
        s.role = "ood"
        ood.append(s)
    pools["ood"] = ood
    # pre-training pool: train pairs only, every (rate, pitch) no demo speaker uses, shuffled
    pt = [Speaker("espeak", a, v, r, p) for (a, v) in sorted(train_pairs) for r in RATES for p in PITCHES
          if (a, v, r, p) not in used]
    random.Random(f"{seed}/pretrain-speakers").shuffle(pt)
    for s in pt:
        s.role = "pretrain"
    pools["pretrain"] = pt
    hashes = Counter(s.hash for ss in pools.values() for s in ss)
    dup = [h for h, c in hashes.items() if c > 1]
    if dup:
        die(f"speaker hash collision {dup}; change the seed")
    return pools, {"train": train_pairs, "dev": dev_pairs, "test": test_pairs}


# ---------------------------------------------------------------------------------------------
# audio


def f32_from_sox(args_in, data, effects):
    """Runs sox from `args_in` (+ stdin `data`) to raw float32 16 kHz mono, returns a list."""
    out = run(["sox", "-D", "-R", "-V1"] + args_in + ["-t", "raw", "-e", "floating-point", "-b", "32",
                                                      "-L", "-c", "1", "-r", str(RATE), "-"] + effects, data)
    a = array.array("f")
    a.frombytes(out)
    if sys.byteorder == "big":
        a.byteswap()
    return list(a)


def raw_in():
    return ["-t", "raw", "-e", "floating-point", "-b", "32", "-L", "-c", "1", "-r", str(RATE), "-"]


def to_raw(x):
    a = array.array("f", x)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


# 0.1 %, not 1 %: with 1 % the weak /f/ of "off" (and other fricative ends) was cut off.
TRIM = ["silence", "1", "0.02", "0.1%", "reverse", "silence", "1", "0.02", "0.1%", "reverse"]


def synthesize(spk, text, tmp):
    """The speech of `text` by `spk`: float samples at 16 kHz, leading/trailing silence trimmed,
    peak normalized to -6 dBFS (final gain is applied later)."""
    wav = os.path.join(tmp, "tts.wav")
    if spk.synth == "espeak":
        run(["espeak-ng", "-v", f"{spk.voice}+{spk.variant}", "-s", str(spk.rate), "-p", str(spk.pitch),
             "-w", wav, text])
    else:
        cmd = ["flite", "-voice", spk.voice]
        if spk.stretch:
            cmd += ["--setf", f"duration_stretch={spk.stretch}"]
        if spk.f0:
            cmd += ["--setf", f"int_f0_target_mean={spk.f0}"]
        run(cmd + ["-t", text, "-o", wav])
    x = f32_from_sox([wav], None, ["gain", "-n", "-6", "rate", "-v", str(RATE)] + TRIM + ["gain", "-n", "-6"])
    if len(x) < RATE // 20:
        die(f"{spk.id} saying {text!r}: only {len(x)} samples after trimming silence")
    return x


def peak_rms(x):
    if not x:
        return 0.0, 0.0
    return max(abs(v) for v in x), math.sqrt(sum(v * v for v in x) / len(x))


def db(v):
    return 20 * math.log10(v) if v > 0 else -math.inf


def quantize(x):
    out = array.array("h", (max(-32768, min(32767, int(round(v * 32768.0)))) for v in x))
    return out


def write_flac(path, x):
    """Writes float samples (|x| < 1) as 16 kHz mono 16-bit FLAC."""
    q = quantize(x)
    if sys.byteorder == "big":
        q.byteswap()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(q.tobytes())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run(["sox", "-D", "-R", "-V1", "-t", "wav", "-", "-C", "8", path], buf.getvalue())


def random_peak_gain(x, rng):
    """Gain that puts the peak at -3 dBFS +- a little (-4.5 .. -2 dBFS)."""
    peak = max(abs(v) for v in x)
    target = 10 ** ((-3.0 + rng.uniform(-1.5, 1.0)) / 20)
    return target / peak


def kws_clip(spk, word, rng, tmp):
    """A 1.0 s keyword clip: (float samples, speech start, speech length)."""
    x = synthesize(spk, word, tmp)
    max_len = int(KWS_MAX_SPEECH_S * RATE)
    if len(x) > max_len:
        with _print_lock:
            SPED_UP.append(f"{spk.id}:{word}")
        x = f32_from_sox(raw_in(), to_raw(x), ["tempo", "-s", f"{len(x) / (max_len - 400):.4f}"] + TRIM)
        if len(x) > max_len:  # tempo is not sample exact: cut the rest with a 10 ms fade
            x = x[:max_len]
            for i in range(160):
                x[max_len - 1 - i] *= i / 160
    g = random_peak_gain(x, rng)
    slack = RATE - len(x)
    lo, hi = int(0.03 * RATE), min(int(0.30 * RATE), slack - int(0.03 * RATE))
    off = rng.randint(lo, hi) if hi > lo else slack // 2
    out = [0.0] * RATE
    for i, v in enumerate(x):
        out[off + i] = v * g
    return out, off, len(x)


def sentence_clip(spk, text, rng, tmp):
    x = synthesize(spk, text, tmp)
    g = random_peak_gain(x, rng)
    lead, tail = int(rng.uniform(0.1, 0.3) * RATE), int(rng.uniform(0.1, 0.3) * RATE)
    return [0.0] * lead + [v * g for v in x] + [0.0] * tail, len(x)


# --- noise (pure python, seeded) -----------------------------------------------------------


def noise(kind, n, rng):
    """Unit-RMS noise of `kind`: white, pink, brown, cafe (pink + brown rumble + 50 Hz hum with
    harmonics, slowly fluctuating), hall (held-out type: band-limited pink + 60 Hz hum + brown)."""
    w = [rng.gauss(0.0, 1.0) for _ in range(n)]

    def pink(src):
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = 0.0
        out = []
        for v in src:  # Paul Kellet's refined pink filter
            b0 = 0.99886 * b0 + v * 0.0555179
            b1 = 0.99332 * b1 + v * 0.0750759
            b2 = 0.96900 * b2 + v * 0.1538520
            b3 = 0.86650 * b3 + v * 0.3104856
            b4 = 0.55000 * b4 + v * 0.5329522
            b5 = -0.7616 * b5 - v * 0.0168980
            out.append(b0 + b1 + b2 + b3 + b4 + b5 + b6 + v * 0.5362)
            b6 = v * 0.115926
        return out

    def brown(src):
        y, out = 0.0, []
        for v in src:
            y = 0.996 * y + 0.06 * v
            out.append(y)
        return out

    def unit(x):
        r = math.sqrt(sum(v * v for v in x) / len(x))
        return [v / r for v in x]

    if kind == "white":
        x = w
    elif kind == "pink":
        x = pink(w)
    elif kind == "brown":
        x = brown(w)
    elif kind in ("cafe", "hall"):
        w2 = [rng.gauss(0.0, 1.0) for _ in range(n)]
        base, hum_f, ph = (60.0, 60.0, rng.uniform(0, 6.28)) if kind == "hall" else (50.0, 50.0, rng.uniform(0, 6.28))
        p, b = unit(pink(w)), unit(brown(w2))
        if kind == "hall":  # darker: one-pole low-pass (-3 dB at ~1.1 kHz)
            y, lp = 0.0, []
            for v in p:
                y += 0.35 * (v - y)
                lp.append(y)
            p = unit(lp)
        mod_f = rng.uniform(0.2, 0.5)
        x = []
        for i in range(n):
            t = i / RATE
            hum = (math.sin(2 * math.pi * hum_f * t + ph) + 0.5 * math.sin(4 * math.pi * base * t)
                   + 0.25 * math.sin(6 * math.pi * base * t))
            env = 1.0 + 0.3 * math.sin(2 * math.pi * mod_f * t)
            x.append(env * (p[i] + 0.6 * b[i]) + 0.25 * hum)
    else:
        raise ValueError(kind)
    return unit(x)


def scaled(x, rms_dbfs):
    g = 10 ** (rms_dbfs / 20)
    return [v * g for v in x]


# --- checks ----------------------------------------------------------------------------------


def flac_info(path):
    """(sample rate, channels, bits per sample, total samples) from the FLAC STREAMINFO block."""
    with open(path, "rb") as f:
        head = f.read(42)
    if head[:4] != b"fLaC" or (head[4] & 0x7F) != 0:
        die(f"{path}: not a FLAC file with STREAMINFO first")
    si = head[8:42]
    v = int.from_bytes(si[10:18], "big")
    rate = v >> 44
    channels = ((v >> 41) & 0x7) + 1
    bits = ((v >> 36) & 0x1F) + 1
    total = v & ((1 << 36) - 1)
    return rate, channels, bits, total


def check_file(path, kind, exact_len=None):
    """Reads a written FLAC back and fails loudly on a bad one. kind: speech | noise."""
    rate, ch, bits, total = flac_info(path)
    if (rate, ch, bits) != (RATE, 1, 16):
        die(f"{path}: {rate} Hz, {ch} ch, {bits} bit (want 16000 Hz mono 16 bit)")
    if exact_len is not None and total != exact_len:
        die(f"{path}: {total} samples, want exactly {exact_len}")
    a = array.array("h")
    a.frombytes(run(["sox", "-V1", path, "-t", "raw", "-e", "signed", "-b", "16", "-L", "-"]))
    if sys.byteorder == "big":
        a.byteswap()
    if len(a) != total:
        die(f"{path}: decoded {len(a)} samples, header says {total}")
    peak = max(abs(v) for v in a) / 32768.0
    nz = [v for v in a if v != 0] if kind == "speech" else a
    rms = math.sqrt(sum(v * v for v in nz) / max(1, len(nz))) / 32768.0
    clipped = sum(1 for v in a if v >= 32767 or v <= -32767)
    if clipped:
        die(f"{path}: {clipped} clipped samples")
    if db(peak) > -0.9:
        die(f"{path}: peak {db(peak):.1f} dBFS, too close to clipping")
    lo_peak, lo_rms = (-12.0, -45.0) if kind == "speech" else (-60.0, -60.0)
    if db(peak) < lo_peak or db(rms) < lo_rms:
        die(f"{path}: silent or too quiet (peak {db(peak):.1f} dBFS, rms {db(rms):.1f} dBFS)")
    return total, db(peak), db(rms)


# ---------------------------------------------------------------------------------------------
# jobs


class Pool:
    """Runs jobs on `jobs` threads (each subprocess is a separate process); results in order."""

    def __init__(self, jobs):
        self.ex = ThreadPoolExecutor(max_workers=jobs)
        self.local = threading.local()
        self.tmp_root = tempfile.mkdtemp(prefix="make_demo_data.")
        self.counter = 0
        self.lock = threading.Lock()

    def tmp(self):
        if not hasattr(self.local, "dir"):
            with self.lock:
                self.counter += 1
                self.local.dir = os.path.join(self.tmp_root, str(self.counter))
            os.makedirs(self.local.dir)
        return self.local.dir

    def map(self, fn, items):
        return list(self.ex.map(lambda it: fn(it, self.tmp()), items))

    def close(self):
        self.ex.shutdown()
        shutil.rmtree(self.tmp_root, ignore_errors=True)


def clip_rng(seed, *key):
    return random.Random("/".join([str(seed)] + [str(k) for k in key]))


# ---------------------------------------------------------------------------------------------
# keyword spotting


def kws_words(split, i):
    """Keywords + this speaker's unknown words (rotating over UNKNOWN_WORDS)."""
    k = UNKNOWN_PER_SPEAKER[split]
    offset = {"train": 0, "dev": 7, "test": 13, "ood": 3}[split]
    unk = [UNKNOWN_WORDS[(offset + k * i + j) % len(UNKNOWN_WORDS)] for j in range(k)]
    return KEYWORDS, unk


def make_kws(out, pools, seed, pool, stats):
    root = os.path.join(out, "kws")
    train_dir = os.path.join(root, "train")
    jobs = []  # (split, speaker, word, is_keyword, index among the speaker's unknown words)
    for split, key in (("train", "kws-train"), ("dev", "kws-dev"), ("test", "kws-test"), ("ood", "ood")):
        for i, spk in enumerate(pools[key]):
            kw, unk = kws_words(split, i)
            jobs += [(split, spk, w, True, 0) for w in kw]
            jobs += [(split, spk, w, False, j) for j, w in enumerate(unk)]

    def work(job, tmp):
        split, spk, word, is_kw, j = job
        rng = clip_rng(seed, "kws", split, spk.id, word)
        x, off, n = kws_clip(spk, word, rng, tmp)
        return x, off, n

    log(f"kws: synthesizing {len(jobs)} clips")
    results = pool.map(work, jobs)

    lists = {"dev": [], "test": []}
    test_clean = []  # (label folder, file name, samples, speech start, speech len)
    for (split, spk, word, is_kw, j), (x, off, n) in zip(jobs, results):
        if split == "ood":
            label = word if is_kw else UNKNOWN
            name = f"{spk.hash}_nohash_{j}.flac"
            path = os.path.join(root, "test-ood", label, name)
            stats.add("kws", "test-ood", label, path, n)
        else:
            name = f"{spk.hash}_nohash_0.flac"
            rel = f"{word}/{name}"
            path = os.path.join(train_dir, word, name)
            label = word if is_kw else UNKNOWN
            stats.add("kws", split, label, path, n)
            if split in lists:
                lists[split].append(rel)
            if split == "test":
                test_clean.append((label, f"{spk.hash}_nohash_{j}.flac", x, off, n, spk))
        write_flac(path, x)
    for split, fname in (("dev", "validation_list.txt"), ("test", "testing_list.txt")):
        with open(os.path.join(train_dir, fname), "w", newline="\n") as f:
            f.write("".join(r + "\n" for r in sorted(lists[split])))

    # background noise recordings (train layout) for the loader's _silence_ cuts
    n_noise = int(NOISE_SECONDS * RATE)
    bg = [("white_noise", "white", -34.0), ("pink_noise", "pink", -30.0),
          ("brown_noise", "brown", -28.0), ("cafe_like", "cafe", -30.0)]
    for name, kind, level in bg:
        x = scaled(noise(kind, n_noise, clip_rng(seed, "bg", name)), level)
        path = os.path.join(train_dir, "_background_noise_", name + ".flac")
        write_flac(path, x)
        stats.add("kws", "train", "_background_noise_", path, 0, kind="noise")

    # out-of-domain silence: same noise types, other seeds, 1 s each
    kinds = ["white", "pink", "brown", "cafe"]
    for i in range(OOD_SILENCE_CLIPS):
        rng = clip_rng(seed, "ood-silence", i)
        kind = kinds[i % len(kinds)]
        level = {"white": -34.0, "pink": -30.0, "brown": -28.0, "cafe": -30.0}[kind] + rng.uniform(-4, 4)
        x = scaled(noise(kind, RATE, rng), level)
        path = os.path.join(root, "test-ood", SILENCE, f"{kind}{i:02d}_nohash_0.flac")
        write_flac(path, x)
        stats.add("kws", "test-ood", SILENCE, path, 0, kind="noise")

    # noisy in-domain test: held-out "hall" noise (never in _background_noise_), 10 dB SNR
    hall = noise("hall", 30 * RATE, clip_rng(seed, "hall-noise"))
    levels = []
    for label, name, x, off, n, spk in sorted(test_clean, key=lambda t: (t[0], t[1])):
        rng = clip_rng(seed, "noisy", label, name)
        start = rng.randrange(len(hall) - RATE)
        nz = hall[start:start + RATE]
        p_speech = sum(v * v for v in x[off:off + n]) / n
        p_noise = sum(v * v for v in nz) / RATE
        g = math.sqrt(p_speech / (p_noise * 10 ** (NOISY_SNR_DB / 10)))
        y = [a + g * b for a, b in zip(x, nz)]
        pk = max(abs(v) for v in y)
        if pk > 10 ** (-1.5 / 20):
            y = [v * 10 ** (-1.5 / 20) / pk for v in y]
            g *= 10 ** (-1.5 / 20) / pk
        levels.append(g * math.sqrt(p_noise))
        path = os.path.join(root, "test-noisy", label, name)
        write_flac(path, y)
        stats.add("kws", "test-noisy", label, path, n)
    levels.sort()
    median = levels[len(levels) // 2]
    for i in range(NOISY_SILENCE_CLIPS):
        rng = clip_rng(seed, "noisy-silence", i)
        start = rng.randrange(len(hall) - RATE)
        nz = hall[start:start + RATE]
        r = math.sqrt(sum(v * v for v in nz) / RATE)
        g = median / r * 10 ** (rng.uniform(-3, 3) / 20)
        path = os.path.join(root, "test-noisy", SILENCE, f"hall{i:02d}_nohash_0.flac")
        write_flac(path, [v * g for v in nz])
        stats.add("kws", "test-noisy", SILENCE, path, 0, kind="noise")
    log(f"kws: test-noisy noise rms median {db(median):.1f} dBFS")

    write_speakers(os.path.join(root, "speakers.csv"),
                   pools["kws-train"] + pools["kws-dev"] + pools["kws-test"] + pools["ood"])


def write_speakers(path, speakers):
    with open(path, "w", newline="") as f:
        rows = [s.row() for s in speakers]
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# ASR


def check_sentences():
    ok = set("abcdefghijklmnopqrstuvwxyz' ")
    seen = set()
    for s in SENTENCES:
        n = len(s.split())
        if not 4 <= n <= 9 or set(s) - ok or s != " ".join(s.split()) or s in seen:
            die(f"bad or duplicate sentence {s!r}")
        seen.add(s)


def split_sentences(seed):
    """(train sentences, held-out sentences). A held-out sentence is taken only if all its
    words occur in the sentences that remain for training."""
    order = list(SENTENCES)
    random.Random(f"{seed}/sentences").shuffle(order)
    held = []
    for s in order:
        if len(held) == ASR_N_HELDOUT:
            break
        rest = [t for t in SENTENCES if t not in held and t != s]
        vocab = set(w for t in rest for w in t.split())
        # every word of s, and of the sentences already held out, must stay covered
        if all(w in vocab for t in held + [s] for w in t.split()):
            held.append(s)
    train = [s for s in SENTENCES if s not in held]
    return train, sorted(held)


def make_asr(out, pools, seed, pool, stats):
    root = os.path.join(out, "asr")
    clips = os.path.join(root, "clips")
    train_s, held = split_sentences(seed)
    rng = random.Random(f"{seed}/asr-plan")
    order = list(train_s)
    rng.shuffle(order)

    def work(job, tmp):
        split, spk, text, k = job
        return sentence_clip(spk, text, clip_rng(seed, "asr", split, spk.id, text), tmp)

    manifests = {}
    # training: utterance k is speaker k % S reading order[k % len(order)], until the minutes
    spk_train = pools["asr-train"]
    rows, total, k = [], 0, 0
    target = int(ASR_TRAIN_MINUTES * 60 * RATE)
    log(f"asr: synthesizing train ({ASR_TRAIN_MINUTES} min)")
    while total < target:
        batch = [("train", spk_train[j % len(spk_train)], order[j % len(order)], j) for j in range(k, k + 16)]
        for job, (x, n) in zip(batch, pool.map(work, batch)):
            if total >= target:
                break
            split, spk, text, j = job
            name = f"train-{spk.hash}-{j:04d}.flac"
            write_flac(os.path.join(clips, name), x)
            stats.add("asr", "train", "", os.path.join(clips, name), n)
            rows.append((f"clips/{name}", text))
            total += len(x)
        k += 16
    manifests["train"] = rows

    # eval splits: ASR_UNSEEN_FRACTION of the utterances read held-out sentences, the rest read
    # training sentences (new speakers); dev and test use disjoint held-out sentences, test-ood
    # reads the same sentences as test (only the voices differ)
    n_unseen = {s: round(ASR_UNSEEN_FRACTION * n) for s, n in ASR_EVAL_UTTERANCES.items()}
    held_rng = random.Random(f"{seed}/asr-held")
    held_order = list(held)
    held_rng.shuffle(held_order)
    dev_held = held_order[:n_unseen["dev"]]
    test_held = held_order[n_unseen["dev"]:n_unseen["dev"] + n_unseen["test"]]
    if len(test_held) < n_unseen["test"] or n_unseen["test-ood"] > len(test_held):
        die("not enough held-out sentences")
    seen_pool = list(train_s)
    random.Random(f"{seed}/asr-seen").shuffle(seen_pool)
    test_seen = seen_pool[:ASR_EVAL_UTTERANCES["test"] - n_unseen["test"]]
    plan = {
        "dev": dev_held + seen_pool[-(ASR_EVAL_UTTERANCES["dev"] - n_unseen["dev"]):],
        "test": test_held + test_seen,
        "test-ood": test_held[:n_unseen["test-ood"]] + test_seen[:ASR_EVAL_UTTERANCES["test-ood"] - n_unseen["test-ood"]],
    }
    for split, key in (("dev", "asr-dev"), ("test", "asr-test"), ("test-ood", "ood")):
        spks = pools[key]
        texts = list(plan[split])
        random.Random(f"{seed}/asr-{split}-order").shuffle(texts)
        jobs = [(split, spks[j % len(spks)], t, j) for j, t in enumerate(texts)]
        log(f"asr: synthesizing {split} ({len(jobs)} utterances)")
        rows = []
        for job, (x, n) in zip(jobs, pool.map(work, jobs)):
            _, spk, text, j = job
            name = f"{split}-{spk.hash}-{j:04d}.flac"
            write_flac(os.path.join(clips, name), x)
            stats.add("asr", split, "", os.path.join(clips, name), n)
            rows.append((f"clips/{name}", text))
        manifests[split] = rows

    train_set = set(t for _, t in manifests["train"])
    train_vocab = set(w for t in train_set for w in t.split())
    for split, rows in manifests.items():
        rows.sort()
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["path", "sentence"])
            w.writerows(rows)
        if split != "train":
            unseen = sum(1 for _, t in rows if t not in train_set)
            words = [w for _, t in rows for w in t.split()]
            oov = sum(1 for w in words if w not in train_vocab)
            stats.note(f"asr {split}: {len(rows)} utterances, {unseen} ({100 * unseen / len(rows):.0f} %) "
                       f"with sentences unseen in train, {oov}/{len(words)} word tokens unseen in train")
    write_speakers(os.path.join(root, "speakers.csv"), pools["asr-train"] + pools["asr-dev"] + pools["asr-test"] + pools["ood"])


# ---------------------------------------------------------------------------------------------
# summary


class Stats:
    def __init__(self):
        self.rows = []  # (task, split, label, path, speech samples, kind)
        self.notes = []

    def add(self, task, split, label, path, speech, kind="speech"):
        self.rows.append((task, split, label, path, speech, kind))

    def note(self, s):
        self.notes.append(s)

    def verify_and_print(self, out):
        log(f"checking {len(self.rows)} files")
        info = {}
        for task, split, label, path, speech, kind in self.rows:
            exact = RATE if task == "kws" and label != "_background_noise_" else None
            info[path] = check_file(path, kind, exact)
        groups = OrderedDict()
        for task, split, label, path, speech, kind in self.rows:
            g = groups.setdefault((task, split), Counter())
            g["files"] += 1
            g["samples"] += info[path][0]
            g["speech"] += speech
            g["bytes"] += os.path.getsize(path)
            g["label:" + (label or "-")] += 1
        print()
        print(f"{'task':4} {'split':11} {'files':>5} {'audio min':>9} {'speech min':>10} {'MB':>6}  clips per class")
        for (task, split), g in groups.items():
            labels = " ".join(f"{k[6:]}={v}" for k, v in sorted(g.items()) if k.startswith("label:") and k != "label:-")
            print(f"{task:4} {split:11} {g['files']:5d} {g['samples'] / RATE / 60:9.2f} {g['speech'] / RATE / 60:10.2f} "
                  f"{g['bytes'] / 1e6:6.2f}  {labels}")
        for n in self.notes:
            print(n)
        print(f"kws clips sped up with sox tempo (word longer than {KWS_MAX_SPEECH_S} s): {len(SPED_UP)}"
              + (f" ({', '.join(sorted(SPED_UP))})" if SPED_UP else ""))
        total = 0
        for sub in ("kws", "asr"):
            b = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out, sub)) for f in fs)
            print(f"{os.path.join(out, sub)}: {b / 1e6:.2f} MB")
            total += b
        print(f"total: {total / 1e6:.2f} MB (budget {SIZE_BUDGET_BYTES / 1e6:.0f} MB)")
        peaks = [v[1] for v in info.values()]
        print(f"peaks {min(peaks):.1f} .. {max(peaks):.1f} dBFS; all files 16 kHz mono 16 bit FLAC, none silent or clipped")
        if total > SIZE_BUDGET_BYTES:
            die("over the size budget")


# ---------------------------------------------------------------------------------------------
# pre-training corpus


def pretrain_sentence(rng):
    t = rng.choice(PT_TEMPLATES)
    n1, n2 = rng.sample(PT_NAMES, 2)
    no1, no2 = rng.sample(PT_NOUNS, 2)
    a1, a2 = rng.sample(PT_ADJS, 2)
    return t.format(adj=a1, adj2=a2, noun=no1, noun2=no2, place=rng.choice(PT_PLACES), name=n1, name2=n2,
                    past=rng.choice(PT_VERBS_PAST), verb=rng.choice(PT_VERBS), motion=rng.choice(PT_MOTION),
                    time=rng.choice(PT_TIMES), pron=rng.choice(PT_PRONS), modal=rng.choice(PT_MODALS))


def make_pretrain(dir_, minutes, pools, seed, pool):
    speakers = pools["pretrain"]
    demo = set(SENTENCES)
    clips = os.path.join(dir_, "clips")
    shutil.rmtree(clips, ignore_errors=True)
    os.makedirs(clips)
    target = int(minutes * 60 * RATE)
    per_speaker = max(12, math.ceil(minutes * 60 / 3.0 / len(speakers)))  # ~3 s per utterance
    rng = random.Random(f"{seed}/pretrain-text")

    def work(job, tmp):
        spk, text, k = job
        return sentence_clip(spk, text, clip_rng(seed, "pretrain", spk.id, k), tmp)

    rows, used, total, k = [], [], 0, 0
    log(f"pretrain: {minutes} min, {per_speaker} utterances per speaker (pool of {len(speakers)} speakers)")
    while total < target:
        batch = []
        for j in range(k, k + 16):
            spk = speakers[(j // per_speaker) % len(speakers)]
            while True:
                text = pretrain_sentence(rng)
                if text not in demo and len(text.split()) >= 4 and text not in KEYWORDS:
                    break
            batch.append((spk, text, j))
        for (spk, text, j), (x, _) in zip(batch, pool.map(work, batch)):
            if total >= target:
                break
            name = f"pt-{spk.hash}-{j:06d}.flac"
            write_flac(os.path.join(clips, name), x)
            check_file(os.path.join(clips, name), "speech")
            rows.append((f"clips/{name}", text))
            if not used or used[-1] is not spk:
                used.append(spk)
            total += len(x)
        k += 16
        if k % 160 == 0:
            log(f"pretrain: {total / RATE / 60:.1f} / {minutes} min")
    with open(os.path.join(dir_, "train.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "sentence"])
        w.writerows(rows)
    write_speakers(os.path.join(dir_, "speakers.csv"), used)
    print(f"{dir_}: {len(rows)} utterances, {total / RATE / 60:.1f} min, {len(used)} speakers, "
          f"{sum(os.path.getsize(os.path.join(clips, f)) for f in os.listdir(clips)) / 1e6:.1f} MB")


# ---------------------------------------------------------------------------------------------


def check_tools():
    for tool in ("espeak-ng", "flite", "sox"):
        if shutil.which(tool) is None:
            die(f"'{tool}' not found (apt-get install espeak-ng flite sox libsox-fmt-all)")
    if " flac " not in " " + run(["sox", "-h"]).decode(errors="replace").replace("\n", " ") + " ":
        die("sox lacks FLAC support")
    voices = run(["espeak-ng", "--voices=en"]).decode()
    names = set(line.split()[1] for line in voices.splitlines()[1:] if line.split())
    for a in ACCENTS:
        if a not in names:
            die(f"espeak-ng has no voice {a}")
    variants = run(["espeak-ng", "--voices=variant"]).decode()
    for v in VARIANTS:
        if f"!v/{v} " not in variants + " ":
            die(f"espeak-ng has no variant {v}")
    fv = run(["flite", "-lv"]).decode().split()
    for v, _, _ in FLITE_SPEAKERS:
        if v not in fv:
            die(f"flite has no voice {v}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="audio_fixtures", help="writes OUT/kws and OUT/asr (default audio_fixtures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="parallel synthesis processes (default 2)")
    ap.add_argument("--pretrain-corpus", metavar="DIR", help="write a pre-training corpus to DIR instead")
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the pre-training corpus (default 60)")
    args = ap.parse_args()
    check_tools()
    check_sentences()
    pools, pairs = build_pools(args.seed)
    pool = Pool(max(1, args.jobs))
    try:
        if args.pretrain_corpus:
            os.makedirs(args.pretrain_corpus, exist_ok=True)
            make_pretrain(args.pretrain_corpus, args.minutes, pools, args.seed, pool)
            return
        for sub in ("kws", "asr"):
            shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
        for role in ("test", "dev", "train"):
            log(f"{role} (accent, variant) pairs: " + ", ".join(f"{a}+{v}" for a, v in sorted(pairs[role])))
        stats = Stats()
        make_kws(args.out, pools, args.seed, pool, stats)
        make_asr(args.out, pools, args.seed, pool, stats)
        stats.verify_and_print(args.out)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
