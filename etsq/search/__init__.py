"""Tree search over reasoning steps: the shared loop, the tree, and the select methods."""
