"""Data: sources (decoding and caching), poisoning, augmentation and batching."""
