//! Parsing `#[event(...)]` / `#[command(...)]` attributes.

use proc_macro2::Span;
use syn::{Attribute, LitInt, LitStr, Member};

/// Which derive is running.
#[derive(Clone, Copy)]
pub enum Kind {
    Event,
    Command,
}

impl Kind {
    /// The attribute's name: `event` or `command`.
    pub fn attr(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Command => "command",
        }
    }

    /// The trait's name.
    pub fn trait_name(self) -> &'static str {
        match self {
            Kind::Event => "Event",
            Kind::Command => "Command",
        }
    }
}

/// Collects every error before reporting them together.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn into_result(self) -> Result<(), syn::Error> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A value with the span it was written at.
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

/// The container attributes.
#[derive(Default)]
pub struct Container {
    pub name: Option<Spanned<String>>,
    pub topic: Option<Spanned<String>>,
    pub version: Option<u32>,
    pub key: Option<Spanned<String>>,
    pub krate: Option<syn::Path>,
    /// `upcast_from = "PreviousType"`: the type of the version before this one.
    pub upcast_from: Option<Spanned<syn::Path>>,
}

fn set_once<T>(slot: &mut Option<T>, value: T, key: &str, span: Span, errors: &mut Errors) {
    if slot.is_some() {
        errors.push(syn::Error::new(
            span,
            format!("duplicate `{key}` attribute"),
        ));
    } else {
        *slot = Some(value);
    }
}

/// Parses the container's `#[event(...)]` attributes.
pub fn container(kind: Kind, attrs: &[Attribute], errors: &mut Errors) -> Container {
    let mut out = Container::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident(kind.attr())) {
        let parsed = attr.parse_nested_meta(|meta| {
            let span = meta.path.span_of();
            if meta.path.is_ident("name") {
                let s: LitStr = meta.value()?.parse()?;
                let v = Spanned {
                    value: s.value(),
                    span: s.span(),
                };
                set_once(&mut out.name, v, "name", span, errors);
            } else if meta.path.is_ident("topic") {
                let s: LitStr = meta.value()?.parse()?;
                let v = Spanned {
                    value: s.value(),
                    span: s.span(),
                };
                set_once(&mut out.topic, v, "topic", span, errors);
            } else if meta.path.is_ident("version") {
                let n: LitInt = meta.value()?.parse()?;
                let v: u32 = n.base10_parse()?;
                set_once(&mut out.version, v, "version", span, errors);
            } else if meta.path.is_ident("key") {
                let s: LitStr = meta
                    .value()
                    .map_err(|_| {
                        meta.error(format!(
                        "on the struct write `key = \"field\"`, or put `#[{}(key)]` on the field",
                        kind.attr()
                    ))
                    })?
                    .parse()?;
                let v = Spanned {
                    value: s.value(),
                    span: s.span(),
                };
                set_once(&mut out.key, v, "key", span, errors);
            } else if meta.path.is_ident("upcast_from") {
                let s: LitStr = meta.value()?.parse()?;
                if matches!(kind, Kind::Command) {
                    return Err(meta.error("`upcast_from` is for events; commands have no upcasting"));
                }
                let v = Spanned {
                    value: s.parse::<syn::Path>()?,
                    span: s.span(),
                };
                set_once(&mut out.upcast_from, v, "upcast_from", span, errors);
            } else if meta.path.is_ident("crate") {
                let s: LitStr = meta.value()?.parse()?;
                let path: syn::Path = s.parse()?;
                set_once(&mut out.krate, path, "crate", span, errors);
            } else {
                let written = path_text(&meta.path);
                let known = ["name", "topic", "version", "key", "upcast_from", "crate"];
                let hint = match closest(&written, &known) {
                    Some(k) => format!("; did you mean `{k}`?"),
                    None => {
                        "; expected one of `name`, `topic`, `version`, `key`, `upcast_from`, `crate`"
                            .into()
                    }
                };
                return Err(meta.error(format!(
                    "unknown {} attribute `{written}`{hint}",
                    kind.attr()
                )));
            }
            Ok(())
        });
        if let Err(e) = parsed {
            errors.push(e);
        }
    }
    out
}

/// Parses a field's `#[event(...)]` attributes; returns the span of `key` if present.
pub fn field(kind: Kind, attrs: &[Attribute], errors: &mut Errors) -> Option<Span> {
    let mut key = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident(kind.attr())) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("key") {
                let span = meta.path.span_of();
                set_once(&mut key, span, "key", span, errors);
                Ok(())
            } else {
                Err(meta.error(format!(
                    "unknown {} field attribute `{}`; expected `key`",
                    kind.attr(),
                    path_text(&meta.path)
                )))
            }
        });
        if let Err(e) = parsed {
            errors.push(e);
        }
    }
    key
}

/// The field a `key` names: `name` or a tuple index.
pub fn member_of(name: &str, span: Span) -> Member {
    match name.parse::<u32>() {
        Ok(index) => Member::Unnamed(syn::Index { index, span }),
        Err(_) => Member::Named(syn::Ident::new(name, span)),
    }
}

/// The candidate within two edits of `written`, if any.
fn closest<'a>(written: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(written, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

fn path_text(path: &syn::Path) -> String {
    quote::quote!(#path).to_string().replace(' ', "")
}

trait SpanOf {
    fn span_of(&self) -> Span;
}

impl SpanOf for syn::Path {
    fn span_of(&self) -> Span {
        syn::spanned::Spanned::span(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    fn parse(attrs: Vec<Attribute>) -> (Container, Result<(), syn::Error>) {
        let mut errors = Errors::default();
        let c = container(Kind::Event, &attrs, &mut errors);
        (c, errors.into_result())
    }

    #[test]
    fn reads_every_key() {
        let (c, r) = parse(vec![
            parse_quote!(#[event(name = "tickets.Booked", topic = "tickets", version = 2, key = "id", crate = "my::cqrs")]),
        ]);
        assert!(r.is_ok());
        assert_eq!(c.name.map(|s| s.value).as_deref(), Some("tickets.Booked"));
        assert_eq!(c.topic.map(|s| s.value).as_deref(), Some("tickets"));
        assert_eq!(c.version, Some(2));
        assert_eq!(c.key.map(|s| s.value).as_deref(), Some("id"));
        let krate = c.krate.map(|p| quote::quote!(#p).to_string());
        assert_eq!(krate.as_deref(), Some("my :: cqrs"));
    }

    #[test]
    fn keys_spread_over_attributes_are_merged() {
        let (c, r) = parse(vec![
            parse_quote!(#[event(name = "A")]),
            parse_quote!(#[event(version = 7)]),
        ]);
        assert!(r.is_ok());
        assert_eq!(c.version, Some(7));
        assert!(c.name.is_some());
    }

    #[test]
    fn unknown_key_is_an_error() {
        let (_, r) = parse(vec![parse_quote!(#[event(nmae = "A")])]);
        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e, "unknown event attribute `nmae`; did you mean `name`?");
        let (_, r) = parse(vec![parse_quote!(#[event(colour = "red")])]);
        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.ends_with(
                "expected one of `name`, `topic`, `version`, `key`, `upcast_from`, `crate`"
            ),
            "{e}"
        );
    }

    #[test]
    fn duplicate_key_is_an_error_and_both_errors_are_kept() {
        let (_, r) = parse(vec![
            parse_quote!(#[event(topic = "a", topic = "b", bogus)]),
        ]);
        let e = r
            .err()
            .map(|e| e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .unwrap_or_default();
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0], "duplicate `topic` attribute");
        assert!(e[1].starts_with("unknown event attribute `bogus`"));
    }

    #[test]
    fn version_must_be_an_integer() {
        let (_, r) = parse(vec![parse_quote!(#[event(version = "2")])]);
        assert!(r.is_err());
        let (_, r) = parse(vec![parse_quote!(#[event(version = -1)])]);
        assert!(r.is_err());
    }

    #[test]
    fn other_attributes_are_ignored() {
        let (c, r) = parse(vec![parse_quote!(#[serde(rename_all = "camelCase")])]);
        assert!(r.is_ok());
        assert!(c.name.is_none());
    }

    #[test]
    fn field_key() {
        let mut errors = Errors::default();
        assert!(field(Kind::Event, &[parse_quote!(#[event(key)])], &mut errors).is_some());
        assert!(field(Kind::Event, &[parse_quote!(#[event(id)])], &mut errors).is_none());
        assert!(errors.into_result().is_err());
    }
}
