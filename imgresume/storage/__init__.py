"""
Storage backends for imgresume: the API (L{interfaces}) and its
implementations (L{filesystem} for shared filesystems, L{s3} for
S3-compatible object stores, L{memory} for tests).
"""
