"""A small word n-gram language model in the ARPA format, from transcripts: a stand-in for KenLM's
`lmplz` where KenLM is not installed (standard library only).

    python3 tools/make_arpa.py --order 3 train.csv > lm.arpa
    klspeech eval --model runs/asr --data test.csv --lm lm.arpa

The bundled ones (audio_fixtures/asr/lm/; the examples drop `'` from transcripts, the bundled
model's vocabulary has none):

    cd audio_fixtures/asr
    python3 ../../tools/make_arpa.py --drop-chars ",?.!-;:\"“%‘”�'" train.csv > lm/train-3gram.arpa
    # without the sentences that also occur in the dev and test sets:
    python3 ../../tools/make_arpa.py --drop-chars ",?.!-;:\"“%‘”�'" train.csv \
        --exclude dev.csv --exclude test.csv --exclude test-ood.csv > lm/train-unseen-3gram.arpa

Input: text files with one sentence per line, or CSV/TSV manifests (their `sentence`, `text` or
`transcript` column). Sentences lose the characters of --drop-chars (klspeech's default
--chars-to-ignore; add what training dropped, e.g. `'`), are lower-cased unless --keep-case,
split on spaces, and padded with <s> ... </s>. Estimate: interpolated absolute discounting
(discount D = 0.5 at every order), written in back-off form as SRILM and KenLM write interpolated models: an n-gram's entry
holds its interpolated probability, a context's back-off weight is the interpolation weight
D * (distinct continuations) / count. Unigrams share their discounted mass uniformly among the
seen words, `</s>` and `<unk>`; `<s>` gets -99 as in lmplz's output; every entry below the top
order has a back-off weight (0 where it is no context), as lmplz writes them. Each order sums to one.
(lmplz uses modified Kneser-Ney with pruning; on large text use it.)
"""
import argparse
import collections
import csv
import math
import sys

D = 0.5


DROP = ",?.!-;:\"“%‘”�"


def sentences(path, keep_case, drop=DROP):
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    first = text.split("\n", 1)[0]
    delim = "\t" if "\t" in first else ","
    header = [h.strip().lower() for h in first.split(delim)]
    col = next((header.index(c) for c in ("sentence", "text", "transcript") if c in header), None)
    if col is None:
        lines = text.splitlines()
    else:
        lines = [row[col] for row in list(csv.reader(text.splitlines(), delimiter=delim))[1:] if len(row) > col]
    for line in lines:
        line = "".join(ch for ch in line if ch not in drop)
        words = line.split() if keep_case else line.lower().split()
        if words:
            yield words


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--keep-case", action="store_true")
    ap.add_argument("--drop-chars", default=DROP, help="characters removed from the text (default: klspeech's --chars-to-ignore)")
    ap.add_argument("--exclude", action="append", default=[], metavar="FILE",
                    help="leave out every sentence that also occurs in FILE (e.g. a test manifest)")
    a = ap.parse_args()
    excluded = {tuple(w) for path in a.exclude for w in sentences(path, a.keep_case, a.drop_chars)}
    counts = [collections.Counter() for _ in range(a.order)]  # counts[k]: (k+1)-grams
    for path in a.inputs:
        for words in sentences(path, a.keep_case, a.drop_chars):
            if tuple(words) in excluded:
                continue
            toks = ["<s>"] + words + ["</s>"]
            for k in range(a.order):
                for i in range(len(toks) - k):
                    g = tuple(toks[i : i + k + 1])
                    if g == ("<s>",):
                        continue
                    counts[k][g] += 1
    # Unigrams.
    n = sum(counts[0].values())
    types = len(counts[0])
    uniform = D * types / n / (types + 1)
    prob = [dict() for _ in range(a.order)]
    for g, c in counts[0].items():
        prob[0][g] = (c - D) / n + uniform
    prob[0][("<unk>",)] = uniform
    # Higher orders, interpolated with the order below.
    ctx_count = [collections.Counter() for _ in range(a.order)]
    ctx_types = [collections.Counter() for _ in range(a.order)]
    for k in range(1, a.order):
        for g, c in counts[k].items():
            ctx_count[k][g[:-1]] += c
            ctx_types[k][g[:-1]] += 1
    backoff = collections.defaultdict(float)  # context tuple -> interpolation weight

    def lower(g, k):
        # P(g[-1] | g[1:-1]) at order k (k-gram probability), recursively.
        if k == 0:
            return prob[0].get(g[-1:], prob[0][("<unk>",)])
        if g[-k - 1 :] in prob[k]:
            return prob[k][g[-k - 1 :]]
        h = g[-k - 1 : -1]
        return backoff.get(h, 1.0) * lower(g, k - 1)

    for k in range(1, a.order):
        for h, c in ctx_count[k].items():
            backoff[h] = D * ctx_types[k][h] / c
        for g, c in counts[k].items():
            h = g[:-1]
            prob[k][g] = (c - D) / ctx_count[k][h] + backoff[h] * lower(g, k - 1)
    out = sys.stdout
    out.write("\\data\\\n")
    for k in range(a.order):
        out.write(f"ngram {k + 1}={len(prob[k]) + (1 if k == 0 else 0)}\n")
    for k in range(a.order):
        out.write(f"\n\\{k + 1}-grams:\n")
        entries = list(prob[k].items())
        if k == 0:
            entries.append((("<s>",), None))
        for g, p in sorted(entries, key=lambda e: e[0]):
            lp = -99.0 if p is None else math.log10(p)
            line = f"{lp:.6f}\t{' '.join(g)}"
            # Every entry below the top order carries a back-off weight, 0 where it is no
            # context, as lmplz writes them (pyctcdecode reads the vocabulary from the 1-grams
            # that have one).
            if k < a.order - 1:
                line += f"\t{math.log10(backoff[g]) if g in backoff else 0.0:.6f}"
            out.write(line + "\n")
    out.write("\n\\end\\\n")


if __name__ == "__main__":
    main()
