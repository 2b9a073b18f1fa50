"""The search tree of one problem: nodes with parent links, scores and KV-cache accounting.

A node's path text (prompt + steps) and step list are built once, from its parent's, the first time
they are asked for: a depth asks for them for every new node (scoring) and every kept one (expanding),
and walking the ancestors each time made that quadratic in the depth.  Only the newest depths need
them, so the search drops those of older depths (`release_paths`): kept for every node, they were a
copy of the whole path per node, the tree's text times its depth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)  # no per-node __dict__: a W=1024 search holds tens of thousands of nodes
class Node:
    """One node: the root holds the formatted prompt, every other node one policy step."""

    idx: int  # position in Tree.nodes; root is 0
    parent: int | None
    depth: int
    text: str  # root: prompt; other nodes: the newest step only
    tokens: int  # tokens of `text` (root: prompt tokens)
    cum_tokens: int  # tokens from the root through this node
    score: float | None = None  # PRM score of the newest step (None for the root)
    terminal: bool = False
    terminal_reason: str | None = None  # "answer" | "eos" | "max_tokens" | "max_depth"
    finish_reason: str | None = None  # policy's: "stop" | "eos" | "length"
    answer: str | None = None  # extracted final answer for terminal nodes
    path: str = "0"  # natural key: child indices from the root, e.g. "0.3.1"
    kept: bool | None = None  # set at this node's selection
    n_children: int | None = None
    cluster: int | None = None
    db_id: int | None = None  # primary key once stored
    children: list[int] = field(default_factory=list)
    # Caches of Tree.full_text / Tree.steps (a node's text never changes once it is in the tree).
    path_text: str | None = field(default=None, repr=False, compare=False)
    path_steps: tuple[str, ...] | None = field(default=None, repr=False, compare=False)


class Tree:
    """All nodes of one problem's search, indexed by Node.idx."""

    def __init__(self, prompt: str, prompt_tokens: int) -> None:
        self.nodes: list[Node] = [
            Node(idx=0, parent=None, depth=0, text=prompt, tokens=prompt_tokens, cum_tokens=prompt_tokens)
        ]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add_child(self, parent: int, text: str, tokens: int, **attrs: object) -> Node:
        p = self.nodes[parent]
        node = Node(
            idx=len(self.nodes),
            parent=parent,
            depth=p.depth + 1,
            text=text,
            tokens=tokens,
            cum_tokens=p.cum_tokens + tokens,
            path=f"{p.path}.{len(p.children)}",
        )
        for key, value in attrs.items():
            setattr(node, key, value)
        p.children.append(node.idx)
        self.nodes.append(node)
        return node

    def ancestors(self, idx: int) -> list[int]:
        """Strict ancestors of idx, nearest first, ending with the root."""
        out: list[int] = []
        parent = self.nodes[idx].parent
        while parent is not None:
            out.append(parent)
            parent = self.nodes[parent].parent
        return out

    def full_text(self, idx: int) -> str:
        """Prompt plus every step from the root to idx: what the policy continues."""
        node = self.nodes[idx]
        if node.path_text is None:
            node.path_text = node.text if node.parent is None else self.full_text(node.parent) + node.text
        return node.path_text

    def step_texts(self, idx: int) -> tuple[str, ...]:
        """Step texts from the first step to idx (the root's prompt excluded), cached."""
        node = self.nodes[idx]
        if node.path_steps is None:
            node.path_steps = () if node.parent is None else (*self.step_texts(node.parent), node.text)
        return node.path_steps

    def release_paths(self, depth: int) -> None:
        """Forget the cached path text and steps of the nodes at `depth` (rebuilt if asked again)."""
        for node in self.nodes:
            if node.depth == depth:
                node.path_text = node.path_steps = None

    def steps(self, idx: int) -> list[str]:
        """Step texts from the first step to idx (the root's prompt excluded)."""
        return list(self.step_texts(idx))

    def subtree_root(self, idx: int) -> int:
        """The depth-1 ancestor of idx (idx itself at depth 1); DVTS's subtree id."""
        chain = [idx, *self.ancestors(idx)]
        if len(chain) < 2:
            raise ValueError("the root belongs to no subtree")
        return chain[-2]

    def at_depth(self, depth: int) -> list[int]:
        return [n.idx for n in self.nodes if n.depth == depth]

    def frontier(self, depth: int) -> list[int]:
        """Non-terminal nodes of `depth`: the candidates a select step sees."""
        return [n.idx for n in self.nodes if n.depth == depth and not n.terminal]

    def leaves(self) -> list[int]:
        return [n.idx for n in self.nodes if n.terminal]

    def kv_tokens(self, ids: Iterable[int]) -> int:
        """Tokens in the union of root-to-node paths of ids (shared prefixes counted once)."""
        seen: set[int] = set()
        for idx in ids:
            for j in (idx, *self.ancestors(idx)):
                if j in seen:
                    break  # everything above j is already counted
                seen.add(j)
        return sum(self.nodes[j].tokens for j in seen)
