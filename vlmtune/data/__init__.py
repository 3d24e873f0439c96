"""vlmtune.data"""
