#!/usr/bin/env python3
"""Fails when the modules of src/ import each other in a circle.

Dependencies in the extension run one way: api -> launcher -> worker -> queue/item ->
catalog/security/error. A circle (a.rs uses b.rs, which uses a.rs) means neither can be
read, changed or tested without the other; this check keeps it from coming back.

It reads the code as text: every `use` tree and every path written in the code that
starts with `crate::`, `super::`, `self::` or the name of a child module, resolved to the
file of the deepest module it names. `mod x;` declarations are ownership, not imports.
Usage: python3 .ci/module_cycles.py [SRC_DIR]   (exit 1 and the circles when there are any)
"""

import re
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "src")


def module_of(path: Path) -> tuple:
    """The module path of a file: src/lib.rs is (), src/a/mod.rs and src/a.rs are ("a",)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] in ("lib", "mod"):
        parts.pop()
    return tuple(parts)


def strip_comments_and_strings(text: str) -> str:
    # Unit tests sit in a `#[cfg(test)] mod tests` at the end of their file, where
    # `super` is the file's own module.
    text = text.split("#[cfg(test)]")[0]
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def expand_use_tree(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"]."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [tree]
    head, _, rest = tree.partition("{")
    body = rest[: rest.rindex("}")]
    parts, depth, current = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        current += ch
    parts.append(current)
    return [p for part in parts if part for p in expand_use_tree(head + part)]


def main() -> int:
    files = {module_of(p): p for p in sorted(SRC.rglob("*.rs"))}
    edges = {module: set() for module in files}
    for module, path in files.items():
        text = strip_comments_and_strings(path.read_text())
        children = {m[-1] for m in files if m[:-1] == module and len(m) == len(module) + 1}
        paths = []
        for tree in re.findall(r"\buse\s+([^;]+);", text):
            paths += expand_use_tree(tree)
        paths += re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", text)
        for used in paths:
            segments = [s for s in used.split("::") if s and " as " not in s]
            segments = [s.split(" as ")[0] for s in segments]
            if not segments:
                continue
            first, rest = segments[0], segments[1:]
            if first == "crate":
                base = ()
            elif first == "self":
                base = module
            elif first == "super":
                base = module[:-1]
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
            elif first in children:
                base, rest = module + (first,), rest
            else:
                continue  # another crate
            target = base
            for segment in rest:
                if target + (segment,) in files:
                    target += (segment,)
                else:
                    break
            if target != module and target in files:
                edges[module].add(target)

    # Tarjan's strongly connected components: every component of two or more is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(component)

    for node in files:
        if node not in index:
            visit(node)

    name = lambda m: str(files[m])
    if circles:
        for circle in circles:
            print("import circle: " + ", ".join(sorted(name(m) for m in circle)))
            for m in sorted(circle):
                for n in sorted(edges[m] & set(circle)):
                    print(f"  {name(m)} -> {name(n)}")
        return 1
    print(f"no import circles among the {len(files)} modules of {SRC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
