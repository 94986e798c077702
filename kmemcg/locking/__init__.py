"""Locking primitives and their checkers: mutex, rwsem, lockdep and lock_stat
(kernel/locking/)."""
