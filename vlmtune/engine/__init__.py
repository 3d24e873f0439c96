"""vlmtune.engine"""
