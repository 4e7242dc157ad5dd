"""verify/checks"""
