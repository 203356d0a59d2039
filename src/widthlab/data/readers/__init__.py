"""Readers for dataset files a user already has; nothing here downloads.

Every reader error is a ``ValueError`` (``FileNotFoundError`` for a missing file) whose message starts
with the file's path and says what is wrong with it.
"""
