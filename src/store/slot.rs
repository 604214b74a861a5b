//! A call's reply slot on our own Redis connections (`pipe.rs`): a one-shot channel whose
//! allocation is used again.
//!
//! Why: tokio's oneshot allocates its shared state for every call. A slot goes back to its
//! thread's spares when the call is done with it, and the next call on that thread takes it,
//! so a call on a warm thread allocates nothing. Only a slot nobody else holds is reused
//! (`Arc::get_mut`): a call given up before its reply leaves the slot to the connection,
//! which drops it once it has delivered that reply. At most [`SPARES`] slots wait per thread.
//!
//! The connection also ends a call whose deadline passed ([`Sender::expire`]): the call learns
//! [`Outcome::Overdue`] and goes, and the reply, when it comes, is dropped with the slot.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use redis::{RedisResult, Value};

use crate::spares::{self, Spares};

/// Spare slots kept per thread: more than the calls one thread has waiting at once in a
/// steady state; beyond it, slots are freed.
const SPARES: usize = 64;

type Reply = RedisResult<Value>;

#[derive(Default)]
struct State {
    reply: Option<Reply>,
    waker: Option<Waker>,
    /// The sender sent its reply, or was dropped without one.
    done: bool,
    /// The call's deadline passed before its reply.
    overdue: bool,
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // Nothing panics while holding it; a poisoned state is still consistent.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    static SPARE: Spares<Shared> = const { Spares::new() };
}

/// A slot's two ends, from this thread's spares when it has one.
pub fn channel() -> (Sender, Receiver) {
    let shared = spares::take(&SPARE).unwrap_or_default();
    (Sender(Some(Arc::clone(&shared))), Receiver(Some(shared)))
}

/// The connection's end: gives the call its reply, once.
pub struct Sender(Option<Shared>);

impl Sender {
    pub fn send(mut self, reply: Reply) {
        if let Some(shared) = self.0.take() {
            finish(&shared, Some(reply));
        }
    }

    /// Ends the call before its reply: its deadline passed. The reply still comes to this
    /// sender, which drops it.
    pub fn expire(&self) {
        let Some(shared) = &self.0 else {
            return;
        };
        let waker = {
            let mut state = lock(shared);
            state.overdue = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Dropped without a reply (the connection's state went away): the call learns it is closed.
impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            finish(&shared, None);
        }
    }
}

/// Hands the call `reply` (`None`: closed without one) and wakes it.
fn finish(shared: &Shared, reply: Option<Reply>) {
    let waker = {
        let mut state = lock(shared);
        state.done = true;
        state.reply = reply;
        state.waker.take()
    };
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// What a call learns from its slot.
#[derive(Debug)]
pub enum Outcome {
    /// The connection's reply.
    Reply(Reply),
    /// The connection went without one.
    Closed,
    /// Its deadline passed first ([`Sender::expire`]).
    Overdue,
}

/// The call's end: a future of its [`Outcome`].
pub struct Receiver(Option<Shared>);

impl Future for Receiver {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let Some(shared) = &self.0 else {
            // Polled after it finished: as a fused future, nothing more.
            return Poll::Ready(Outcome::Closed);
        };
        let mut state = lock(shared);
        if state.done {
            let outcome = state.reply.take().map_or(Outcome::Closed, Outcome::Reply);
            drop(state);
            self.recycle();
            return Poll::Ready(outcome);
        }
        if state.overdue {
            // The sender still holds the slot: it is freed once the reply comes.
            drop(state);
            self.0 = None;
            return Poll::Ready(Outcome::Overdue);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Receiver {
    /// Puts the slot back in this thread's spares if nobody else holds it (then it is
    /// emptied without locking it: no one else can).
    fn recycle(&mut self) {
        let Some(mut shared) = self.0.take() else {
            return;
        };
        let Some(state) = Arc::get_mut(&mut shared) else {
            return;
        };
        *state.get_mut().unwrap_or_else(PoisonError::into_inner) = State::default();
        spares::give(&SPARE, shared, SPARES);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.recycle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spares() -> usize {
        SPARE.with(Spares::len)
    }

    fn empty_spares() {
        SPARE.with(Spares::clear);
    }

    #[tokio::test]
    async fn a_reply_reaches_its_call_and_the_slot_is_used_again() {
        empty_spares();
        let (to, reply) = channel();
        let first = to.0.as_ref().map(Arc::as_ptr);
        to.send(Ok(Value::Int(7)));
        assert!(matches!(reply.await, Outcome::Reply(Ok(Value::Int(7)))));
        assert_eq!(spares(), 1);
        let (to, reply) = channel();
        assert_eq!(to.0.as_ref().map(Arc::as_ptr), first, "the same slot");
        assert_eq!(spares(), 0);
        // Sent before or after the call waits, the reply is the one sent.
        let waiting = tokio::spawn(reply);
        tokio::task::yield_now().await;
        to.send(Ok(Value::Int(8)));
        assert!(matches!(
            waiting.await.unwrap(),
            Outcome::Reply(Ok(Value::Int(8)))
        ));
    }

    #[tokio::test]
    async fn a_sender_dropped_without_a_reply_closes_the_call() {
        empty_spares();
        let (to, reply) = channel();
        drop(to);
        assert!(matches!(reply.await, Outcome::Closed));
        assert_eq!(spares(), 1);
    }

    #[test]
    fn a_call_given_up_leaves_its_slot_to_the_sender() {
        empty_spares();
        let (to, reply) = channel();
        drop(reply);
        assert_eq!(spares(), 0, "the sender still holds it");
        to.send(Ok(Value::Nil));
        assert_eq!(spares(), 0, "freed, not reused");
        // A slot reused is empty: no reply of an earlier call leaks into a later one.
        let (to, reply) = channel();
        drop(to);
        drop(reply);
    }

    #[tokio::test]
    async fn an_expired_call_ends_overdue_and_its_late_reply_frees_the_slot() {
        empty_spares();
        let (to, reply) = channel();
        let waiting = tokio::spawn(reply);
        tokio::task::yield_now().await;
        to.expire();
        assert!(matches!(waiting.await.unwrap(), Outcome::Overdue));
        assert_eq!(spares(), 0, "the sender still holds it");
        to.send(Ok(Value::Int(9)));
        assert_eq!(spares(), 0, "freed with the late reply, not reused");
        // Expired before the call waits: it ends at its first poll.
        let (to, reply) = channel();
        to.expire();
        assert!(matches!(reply.await, Outcome::Overdue));
        // A slot that comes back to the spares is not overdue for its next call.
        let (to, reply) = channel();
        to.send(Ok(Value::Nil));
        assert!(matches!(reply.await, Outcome::Reply(Ok(Value::Nil))));
        let (to, reply) = channel();
        to.send(Ok(Value::Int(1)));
        assert!(matches!(reply.await, Outcome::Reply(Ok(Value::Int(1)))));
    }

    #[test]
    fn at_most_so_many_spares_are_kept() {
        empty_spares();
        let slots: Vec<_> = (0..SPARES + 10).map(|_| channel()).collect();
        for (to, reply) in slots {
            to.send(Ok(Value::Nil));
            drop(reply);
        }
        assert_eq!(spares(), SPARES);
    }
}
