//! What a processor knows of the events and commands it handles: their names, topics and
//! versions, and how to read an older version.

use crate::{Command, Event};

/// The static description shared by events and commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub name: &'static str,
    pub topic: Option<&'static str>,
    pub version: u32,
}

impl Descriptor {
    pub(crate) fn event<E: Event>() -> Self {
        Descriptor {
            name: E::NAME,
            topic: E::TOPIC,
            version: E::VERSION,
        }
    }

    pub(crate) fn command<C: Command>() -> Self {
        Descriptor {
            name: C::NAME,
            topic: C::TOPIC,
            version: C::VERSION,
        }
    }
}

/// [`Event::upcast`] of a type: reads an older version's payload, or `None` with no path.
pub(crate) type UpcastFn<T> = fn(u32, &[u8]) -> Option<Result<T, crate::CodecError>>;

/// How a handler of `T` reads the versions of its messages: the version it knows, and how to
/// read an older one.
pub(crate) struct Versions<T> {
    pub name: &'static str,
    pub current: u32,
    pub upcast: UpcastFn<T>,
}

impl<T> Clone for Versions<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Versions<T> {}

impl<T> Versions<T> {
    pub(crate) fn event() -> Self
    where
        T: Event,
    {
        Versions {
            name: T::NAME,
            current: T::VERSION,
            upcast: T::upcast,
        }
    }

    pub(crate) fn command() -> Self
    where
        T: Command,
    {
        Versions {
            name: T::NAME,
            current: T::VERSION,
            upcast: |_, _| None,
        }
    }
}
