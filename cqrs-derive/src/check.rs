//! Checks across attributes: valid names and topics, one key.

use proc_macro2::Span;
use syn::{Data, DeriveInput, Fields, Member};

use crate::attr::{self, Container, Errors, Kind};

/// What the expansion needs, once checked.
pub struct Checked {
    pub name: String,
    pub topic: Option<String>,
    pub version: u32,
    pub key: Option<Member>,
    pub upcast_from: Option<syn::Path>,
}

/// Same rule as `cqrs_core::validate_topic`: 1 to 249 of ASCII letters, digits, `.`, `_`, `-`.
pub fn topic_error(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("a topic cannot be empty".into());
    }
    if topic.len() > 249 {
        return Some(format!("topic `{topic}` is longer than 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Some(format!("`{topic}` is not a valid topic"));
    }
    topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .map(|c| {
            format!("topic `{topic}` contains `{c}`; use ASCII letters, digits, `.`, `_` and `-`")
        })
}

pub fn check(input: &DeriveInput, kind: Kind, errors: &mut Errors) -> (Checked, Option<syn::Path>) {
    let container = attr::container(kind, &input.attrs, errors);
    let fields = match &input.data {
        Data::Struct(s) => Some(&s.fields),
        Data::Enum(e) => {
            errors.push(syn::Error::new(
                e.enum_token.span,
                format!(
                    "#[derive({})] supports structs only, not enums",
                    kind.trait_name()
                ),
            ));
            None
        }
        Data::Union(u) => {
            errors.push(syn::Error::new(
                u.union_token.span,
                format!(
                    "#[derive({})] supports structs only, not unions",
                    kind.trait_name()
                ),
            ));
            None
        }
    };
    let key = fields.and_then(|f| key_field(kind, f, &container, errors));
    let Container {
        name,
        topic,
        version,
        krate,
        upcast_from,
        ..
    } = container;
    if let (Some(from), None | Some(1)) = (&upcast_from, version) {
        errors.push(syn::Error::new(
            from.span,
            "`upcast_from` needs `version = n` with n > 1: the previous type has a lower version",
        ));
    }

    let name = match name {
        Some(n) => {
            if n.value.trim().is_empty() {
                errors.push(syn::Error::new(
                    n.span,
                    format!("the {} name cannot be empty", kind.attr()),
                ));
            }
            if topic.is_none() {
                if let Some(e) = topic_error(&n.value) {
                    errors.push(syn::Error::new(
                        n.span,
                        format!("{e}; the name is also the topic unless `topic = \"...\"` is set"),
                    ));
                }
            }
            n.value
        }
        None => input.ident.to_string(),
    };
    if let Some(t) = &topic {
        if let Some(e) = topic_error(&t.value) {
            errors.push(syn::Error::new(t.span, e));
        }
    }
    let checked = Checked {
        name,
        topic: topic.map(|t| t.value),
        version: version.unwrap_or(1),
        key,
        upcast_from: upcast_from.map(|u| u.value),
    };
    (checked, krate)
}

fn key_field(
    kind: Kind,
    fields: &Fields,
    container: &Container,
    errors: &mut Errors,
) -> Option<Member> {
    let mut found: Option<(Member, Span)> = None;
    for (i, field) in fields.iter().enumerate() {
        let Some(span) = attr::field(kind, &field.attrs, errors) else {
            continue;
        };
        let member = match &field.ident {
            Some(ident) => Member::Named(ident.clone()),
            None => Member::Unnamed(syn::Index {
                index: i as u32,
                span,
            }),
        };
        if found.is_some() {
            errors.push(syn::Error::new(
                span,
                format!("`#[{}(key)]` is on more than one field", kind.attr()),
            ));
        } else {
            found = Some((member, span));
        }
    }
    match (&container.key, found) {
        (Some(k), Some(_)) => {
            errors.push(syn::Error::new(
                k.span,
                format!(
                    "the key is set twice: here and with `#[{}(key)]` on a field",
                    kind.attr()
                ),
            ));
            None
        }
        (Some(k), None) => {
            let member = attr::member_of(&k.value, k.span);
            let exists = fields
                .iter()
                .enumerate()
                .any(|(i, f)| match (&f.ident, &member) {
                    (Some(ident), Member::Named(m)) => ident == m,
                    (None, Member::Unnamed(idx)) => idx.index as usize == i,
                    _ => false,
                });
            if !exists {
                errors.push(syn::Error::new(
                    k.span,
                    format!("no field `{}` to use as the key", k.value),
                ));
                return None;
            }
            Some(member)
        }
        (None, found) => found.map(|(m, _)| m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(topic_error("tickets.Booking-v2_x"), None);
        assert!(topic_error("").is_some());
        assert!(topic_error("has space")
            .unwrap_or_default()
            .contains("contains ` `"));
        assert!(topic_error("..").is_some());
        assert!(topic_error(&"a".repeat(250)).is_some());
    }
}
