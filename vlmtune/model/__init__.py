"""vlmtune.model"""
