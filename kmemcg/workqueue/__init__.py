"""Workqueues: kernel/workqueue.c (the 3.x-4.x design) on real worker threads.

``k.create_workqueue(name, max_active)`` is ``alloc_workqueue(name, 0, max_active)``;
``k.system_wq`` is ``system_wq`` ("events"). A :class:`Work` is a ``struct work_struct``
(``INIT_WORK``): a function, its arguments and a name that is its lockdep class (the kernel's
class is per ``INIT_WORK`` site; here it defaults to the function's ``__qualname__``).
``queue_work`` / ``flush_work`` / ``cancel_work_sync`` / ``flush_workqueue`` /
``destroy_workqueue`` keep the kernel's contracts: a pending work is not queued twice, a work
never runs concurrently with itself, a flush waits for the instance(s) queued before it, a
cancel removes the pending instance and waits for a running one, destroy drains first.

Lockdep sees what it sees in the kernel: process_one_work() holds the workqueue's map (class =
workqueue name) and the work's map (class = work name) around the function; flush_work() and
cancel_work_sync() of a pending or running work take the work's map (and the workqueue's map
when max_active == 1, as start_flush_work() does); flush_workqueue() takes the workqueue's map.
So flushing while holding a lock the work takes is reported as a circular dependency even in a
run that does not deadlock.

Differences from the kernel:

* Each workqueue has its own workers (one unbound pool per workqueue), started on demand up to
  ``max_active`` and named like unbound kworkers (``kworker/u8:3``); so at most ``max_active``
  items of a workqueue run at once (the kernel's ``pwq->nr_active`` limit). No per-CPU pools,
  concurrency management, rescuers, delayed or high-priority work.
* The kernel keeps a work non-reentrant per workqueue; the model everywhere (a work queued on
  another workqueue while running waits for the running instance).
* Idle workers sleep on a plain condition, not through the wait tracker: an idle kworker is
  TASK_IDLE in the kernel, which the hung-task watchdog ignores. A worker idle for
  :data:`IDLE_WORKER_TIMEOUT` exits if another idle one remains (kernel: 300 s, keeps 2).
* Start-of-flush lockdep follows the 3.x kernels (work map only when pending or running; no
  read acquisition of the workqueue map when max_active > 1).
* An exception escaping a work function is a finding (the kernel would oops); the worker
  survives. A KasanOops is not reported again: KASAN's report is the oops. A work that
  returns with locks held or inside an RCU read-side section is the kernel's "BUG: workqueue
  leaked lock or atomic".
* queue_work() on a draining workqueue from outside it, or on a destroyed one, is a finding
  and returns False (the kernel WARNs, or uses freed memory).

Event points (``obj`` is the Work, label its name): ``work_queue`` (queued), ``work_start``
(about to run, in the worker), ``work_end`` (returned, in the worker).

Lock contract: one raw lock per kernel (``Workqueues._lock``) guards every workqueue's list,
workers and counters and every Work's state fields. Model code (work functions, lockdep,
instruments, thread start) always runs with it released. ``waiter_owners()`` reads without it:
the wait-for detector takes its answers as hints and confirms a cycle on a second look.

Modules: :mod:`~kmemcg.workqueue.work` (Work, Worker, Workqueue and the worker loop),
:mod:`~kmemcg.workqueue.subsys` (``k.workqueues``: process_one_work, the reports),
:mod:`~kmemcg.workqueue.api` (queue_work, flush_work, cancel_work_sync, ...).
"""

from kmemcg.workqueue.api import (
    cancel_work,
    cancel_work_sync,
    destroy_workqueue,
    drain_workqueue,
    flush_work,
    flush_workqueue,
    queue_work,
    schedule_work,
)
from kmemcg.workqueue.subsys import Workqueues
from kmemcg.workqueue.work import (
    IDLE_WORKER_TIMEOUT,
    WQ_DFL_ACTIVE,
    WQ_MAX_ACTIVE,
    Work,
    Worker,
    Workqueue,
)

__all__ = ["Work", "Worker", "Workqueue", "Workqueues", "queue_work", "schedule_work",
           "flush_work", "cancel_work", "cancel_work_sync", "flush_workqueue",
           "drain_workqueue", "destroy_workqueue", "WQ_DFL_ACTIVE", "WQ_MAX_ACTIVE",
           "IDLE_WORKER_TIMEOUT"]
