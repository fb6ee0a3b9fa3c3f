"""
What model.py adds to nanoGPT's model.py, line by line: every non-blank added line sorted into one
of the four kinds the project allows (ParScale; the KV cache and decode step; grouped-query
attention; config checks) or "other", a count per kind, and the "other" lines in full.
docs/model.md quotes its output.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    git -C /tmp/nanoGPT show 3adf61e:model.py > /tmp/nanogpt_model.py   # its last commit, 2025-11-12
    python scripts/nanogpt_diff.py /tmp/nanogpt_model.py            # the counts and the "other" lines
    python scripts/nanogpt_diff.py /tmp/nanogpt_model.py --lines    # every added line with its kind

nanoGPT's file is read from the path given; it is not part of this repository. Lines are paired by
a longest common subsequence, so the counts are those of `diff nanogpt_model.py model.py`: a line
is added when it is not an unchanged nanoGPT line (a nanoGPT line only re-indented counts as added).

How an added line gets its kind, the first rule that applies:
  1. inside GPTConfig.__post_init__: config checks (at most 25 lines);
  2. its own words, code and comment: ParScale's (stream, prefix, aggregator, ParScale, ...), else
     the KV cache's and decode step's (cache, decode, layer_idx, pos, ...), else GQA's (GQA,
     n_kv_head, head_dim, ...); but a docstring line of a def or class added whole goes by rule 6;
  3. a later line of a statement whose first line is added: that first line's kind;
  4. a comment: the words of its comment block, else the kind of the code line it explains (next);
  5. code that a comment explains (below it, in the same paragraph and indentation): its words;
  6. a line of a def or class added whole: the words of its def or class line, else of the ones
     around it, else of their docstrings, innermost first;
  7. a line in a block that an added if/else/with/for/while line opens: that line's kind;
  8. otherwise: other.
The words are a heuristic; `--lines` prints every decision, so that a reader can check each one.
"""
import argparse
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["parscale", "cache", "gqa", "checks", "other"]
NAMES = dict(parscale="ParScale", cache="KV cache and decode step", gqa="GQA", checks="config checks",
             other="other")
WORDS = [  # rule 2, in this order
    ("parscale", r"ParScale|stream|prefix|aggregat|smoothing|2505\.10475|\bP\b|\bP\*"),
    ("cache", r"cache|KVCache|decode|DECODE_BACKENDS|sdpa_kernel|nullcontext|layer_idx|\bpos\b|\bstart\b"),
    ("gqa", r"GQA|grouped|n_kv_head|nkvh|kv_dim|head_dim|\bHkv\b"),
]
CHECKS_REGION = ("GPTConfig", "__post_init__")  # rule 1
CHECKS_LIMIT = 25
OPENERS = re.compile(r"(if|elif|else|with|for|while|try|except|finally)\b")  # rule 7


def added_lines(a, b):
    """1-based numbers of the lines of b, and of a, outside a longest common subsequence of a and b."""
    n, m = len(a), len(b)
    lcs = [[0] * (m + 1) for _ in range(n + 1)]  # lcs[i][j]: the longest of a[i:] and b[j:]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            lcs[i][j] = lcs[i + 1][j + 1] + 1 if a[i] == b[j] else max(lcs[i + 1][j], lcs[i][j + 1])
    i = j = 0
    added, deleted = [], []
    while i < n or j < m:
        if i < n and j < m and a[i] == b[j]:
            i, j = i + 1, j + 1
        elif j < m and (i == n or lcs[i][j + 1] >= lcs[i + 1][j]):
            added.append(j + 1)
            j += 1
        else:
            deleted.append(i + 1)
            i += 1
    return added, deleted


def structure(source):
    """Per line (1-based): the names of the defs and classes it sits in, and the first line of its
    statement; per def or class: (its lines with decorators, its def lines, its docstring lines)."""
    scopes, stmt_start, blocks = {}, {}, []

    def visit(node, names):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                inner = names + (child.name,)
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                for line in range(first, child.end_lineno + 1):
                    scopes[line] = inner
                doc, docs = child.body[0], range(0)
                if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) \
                        and isinstance(doc.value.value, str):
                    docs = range(doc.lineno, doc.end_lineno + 1)
                header = range(child.lineno, child.body[0].lineno)
                blocks.append((range(first, child.end_lineno + 1), header, docs))
                visit(child, inner)
            elif isinstance(child, ast.stmt):
                body = getattr(child, "body", None)  # a compound statement: its header line(s) only
                end = body[0].lineno - 1 if body else child.end_lineno
                for line in range(child.lineno, max(end, child.lineno) + 1):
                    stmt_start[line] = child.lineno
                visit(child, names)

    visit(ast.parse(source), ())
    return scopes, stmt_start, blocks


def words(text):
    return next((kind for kind, pattern in WORDS if re.search(pattern, text)), None)


def indent(line):
    return len(line) - len(line.lstrip())


def is_comment(line):
    return line.strip().startswith("#")


def classify(lines, added, source):
    """{line number: kind} for the non-blank added lines (1-based) of ours: the docstring's rules."""
    scopes, stmt_start, blocks = structure(source)
    docstring_lines = {n for _, _, docs in blocks for n in docs}
    kinds = {}

    def text(numbers):
        return " ".join(lines[m - 1] for m in numbers)

    def comment_block(n):  # the contiguous comment lines around comment line n, at its indentation
        top, bottom, level = n, n, indent(lines[n - 1])
        while top > 1 and is_comment(lines[top - 2]) and indent(lines[top - 2]) == level:
            top -= 1
        while bottom < len(lines) and is_comment(lines[bottom]) and indent(lines[bottom]) == level:
            bottom += 1
        return range(top, bottom + 1)

    def whole_block_kind(n):  # rule 6
        whole = sorted([(span, head, docs) for span, head, docs in blocks
                        if n in span and all(m in added or not lines[m - 1].strip() for m in span)],
                       key=lambda block: len(block[0]))
        texts = [head for _, head, _ in whole] + [docs for _, _, docs in whole]
        return next((k for k in (words(text(t)) for t in texts) if k), None)

    def explained_by(n):  # rule 5: the comment block above code line n, in its paragraph
        m, level = n - 1, indent(lines[n - 1])
        while m >= 1 and lines[m - 1].strip() and not is_comment(lines[m - 1]) and indent(lines[m - 1]) == level:
            m -= 1
        if m >= 1 and is_comment(lines[m - 1]) and indent(lines[m - 1]) == level:
            return words(text(comment_block(m)))
        return None

    def opener(n):  # rule 7: the if/else/with/... line that opens the block of line n
        level = indent(lines[n - 1])
        m = next((m for m in range(n - 1, 0, -1)
                  if lines[m - 1].strip() and not is_comment(lines[m - 1]) and indent(lines[m - 1]) < level), None)
        return m if m and OPENERS.match(lines[m - 1].strip()) else None

    def kind_of(n, seen=()):
        if n in kinds or n in seen:
            return kinds.get(n)
        seen, line = seen + (n,), lines[n - 1]
        if scopes.get(n, ())[-2:] == CHECKS_REGION:  # rule 1
            return "checks"
        kind = whole_block_kind(n) if n in docstring_lines else None  # rule 2's exception
        kind = kind or words(line)  # rule 2
        start = stmt_start.get(n, n)
        if kind is None and start != n and start in added:  # rule 3
            kind = kind_of(start, seen)
        if kind is None and is_comment(line):  # rule 4
            block = comment_block(n)
            kind = words(text(block))
            if kind is None and block[-1] + 1 in added:
                kind = kind_of(block[-1] + 1, seen)
        if kind is None and not is_comment(line):  # rule 5
            kind = explained_by(n)
        kind = kind or whole_block_kind(n)  # rule 6
        if kind is None and opener(n) in added:  # rule 7
            kind = kind_of(opener(n), seen)
        return kind

    for n in sorted(added):
        if lines[n - 1].strip():
            kinds[n] = kind_of(n) or "other"
    return kinds


def compare(nanogpt_text, ours_text):
    """The diff of the two files, and the kind of every non-blank added line of ours."""
    a, b = nanogpt_text.splitlines(), ours_text.splitlines()
    added, deleted = added_lines(a, b)
    kinds = classify(b, set(added), ours_text)
    counts = {kind: sum(1 for k in kinds.values() if k == kind) for kind in KINDS}
    return dict(nanogpt_lines=len(a), ours_lines=len(b), added=len(added), deleted=len(deleted),
                added_nonblank=len(kinds), deleted_nonblank=sum(1 for n in deleted if a[n - 1].strip()),
                kinds=kinds, counts=counts, lines=b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nanogpt", help="nanoGPT's model.py (commit 3adf61e), read from this path")
    p.add_argument("--model", default=os.path.join(ROOT, "model.py"), help="the file to compare")
    p.add_argument("--lines", action="store_true", help="print every non-blank added line and its kind")
    args = p.parse_args(argv)
    texts = []
    for path in (args.nanogpt, args.model):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: cannot read {path} ({e}); --help says how to get nanoGPT's model.py")
    r = compare(*texts)
    if args.lines:
        for n, kind in sorted(r["kinds"].items()):
            print(f"{n:4d} {kind:8} {r['lines'][n - 1]}")
        print()
    print(f"nanoGPT's model.py {r['nanogpt_lines']} lines, {os.path.basename(args.model)} {r['ours_lines']}: "
          f"-{r['deleted']} / +{r['added']} (non-blank: -{r['deleted_nonblank']} / +{r['added_nonblank']})")
    print("added non-blank lines by kind: " + ", ".join(f"{NAMES[k]} {r['counts'][k]}" for k in KINDS)
          + f" (config checks: at most {CHECKS_LIMIT})")
    for n, kind in sorted(r["kinds"].items()):
        if kind == "other":
            print(f"other, line {n}: {r['lines'][n - 1].strip()}")
    return r


if __name__ == "__main__":
    main()
