#!/usr/bin/env python3
"""Prints the import graph between the top-level modules of src/ and its circles.

Every `crate::<module>` a file names in code (comments left out, grouped imports
included) is an edge from the file's top-level module. `-v` lists each edge with the
files that make it. tests/architecture.rs checks the same graph has no circle.

    python3 scripts/import-graph.py [-v] [repository root]
"""
import os
import re
import sys


def graph(root):
    src = os.path.join(root, "src")
    edges = {}
    for directory, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, src)
            top = relative.split(os.sep)[0].removesuffix(".rs")
            if top in ("lib", "main"):
                continue
            code = "\n".join(line.split("//")[0] for line in open(path).read().splitlines())
            targets = set()
            for rest in code.split("crate::")[1:]:
                if rest.startswith("{"):
                    depth, start = 0, True
                    for i, c in enumerate(rest[1:]):
                        if c == "{":
                            depth += 1
                        elif c == "}" and depth == 0:
                            break
                        elif c == "}":
                            depth -= 1
                        elif c == "," and depth == 0:
                            start = True
                        elif start and not c.isspace():
                            start = False
                            targets.add(re.match(r"[a-z0-9_]*", rest[1 + i:]).group(0))
                else:
                    targets.add(re.match(r"[a-z0-9_]*", rest).group(0))
            for target in targets - {"", "self", top}:
                edges.setdefault(top, {}).setdefault(target, set()).add(relative)
    return edges


def circles(edges):
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {t for e in edges.values() for t in e}):
        if v not in index:
            visit(v)
    return found


def main():
    args = [a for a in sys.argv[1:] if a != "-v"]
    edges = graph(args[0] if args else ".")
    pairs = sorted((a, b) for a in edges for b in edges[a])
    for a, b in pairs:
        files = f"   ({', '.join(sorted(edges[a][b]))})" if "-v" in sys.argv else ""
        print(f"{a} -> {b}{files}")
    found = circles(edges)
    nodes = set(edges) | {t for e in edges.values() for t in e}
    print(f"modules {len(nodes)}, edges {len(pairs)}, circles {len(found)}")
    for component in found:
        print("circle:", " ".join(component))


if __name__ == "__main__":
    main()
