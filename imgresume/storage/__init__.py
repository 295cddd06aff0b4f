"""
Storage backends for imgresume: the API (L{interfaces}) and its
implementations (L{filesystem} for shared filesystems, L{memory} for tests).
"""
