"""vlmtune.eval"""
