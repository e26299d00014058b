"""Data: files -> rows (loading) -> canonical records (formats) -> token ids + loss masks (tokenize)."""
