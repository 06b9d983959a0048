"""Retrieval: embed the corpus (embed.py), index the vectors (index.py), query them (search.py).

Submodules are imported explicitly (`from longctx.retrieval.embed import embed_corpus`) so that
importing the package does not pull in torch or faiss.
"""
