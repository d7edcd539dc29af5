"""cpgan: CPGAN (Content-Parsing GAN, arXiv 1912.08562) for text-to-image synthesis — every stage trainable."""

__version__ = "0.1.0"
