"""vlmtune.convert"""
