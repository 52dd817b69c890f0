//! `#[command]` and `#[event]`: parse the route, check it, implement the message traits and
//! register the route with `inventory`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, Data, DeriveInput, Fields, LitStr, Member, Path, Token};

use crate::names;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Command,
    Event,
}

impl Kind {
    fn attr(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
        }
    }
}

#[derive(Default)]
struct Args {
    queue: Option<LitStr>,
    topic: Option<LitStr>,
    name: Option<LitStr>,
    encrypt: bool,
    options: crate::options::QueueOptions,
}

fn parse_args(kind: Kind, args: TokenStream) -> syn::Result<Args> {
    let mut out = Args::default();
    let parser = syn::meta::parser(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        if kind == Kind::Command && out.options.parse(&key, &meta)? {
            return Ok(());
        }
        if kind == Kind::Event && crate::options::KEYS.contains(&key.as_str()) {
            return Err(meta.error(format!(
                "`{key}` is a queue setting; an event's queues are its handlers' subscriber \
                 queues: put it on the #[handler] that handles this event"
            )));
        }
        match (key.as_str(), kind) {
            ("queue", Kind::Command) => set_once(&mut out.queue, &meta),
            ("topic", Kind::Event) => set_once(&mut out.topic, &meta),
            ("name", _) => set_once(&mut out.name, &meta),
            ("encrypt", _) => {
                if out.encrypt {
                    return Err(meta.error("`encrypt` is given twice"));
                }
                if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                    return Err(meta.error("`encrypt` takes no value: write `encrypt`"));
                }
                out.encrypt = true;
                Ok(())
            }
            ("topic", Kind::Command) => Err(meta.error(
                "a command is sent to one queue, not published to a topic: write \
                 `#[command(queue = \"...\")]`, or make this type an `#[event(topic = \"...\")]`",
            )),
            ("queue", Kind::Event) => Err(meta.error(
                "an event is published to a topic, not sent to a queue: write \
                 `#[event(topic = \"...\")]`, or make this type a `#[command(queue = \"...\")]` \
                 (each handling service gets its own subscriber queue automatically)",
            )),
            _ => {
                let (known, expected): (Vec<&str>, &str) = match kind {
                    Kind::Command => (
                        ["queue", "name", "encrypt"]
                            .into_iter()
                            .chain(crate::options::KEYS.iter().copied())
                            .collect(),
                        "`queue = \"...\"`, `name = \"...\"`, `encrypt`, or a queue setting \
                         (`visibility_timeout`, `retention`, `delay`, `max_receive_count`, \
                         `high_throughput`, `sse`, `tags(..)`)",
                    ),
                    Kind::Event => (
                        vec!["topic", "name", "encrypt"],
                        "`topic = \"...\"`, `name = \"...\"` or `encrypt`",
                    ),
                };
                let given = quote::ToTokens::to_token_stream(&meta.path)
                    .to_string()
                    .replace(' ', "");
                let hint = match did_you_mean(&given, &known) {
                    Some(k) => format!("did you mean `{k}`? "),
                    None => String::new(),
                };
                Err(meta.error(format!(
                    "unknown #[{}] argument `{given}`; {hint}expected {expected}",
                    kind.attr(),
                )))
            }
        }
    });
    syn::parse::Parser::parse2(parser, args)?;
    Ok(out)
}

/// The known argument closest to a misspelt one (at most two edits away, case ignored).
pub(crate) fn did_you_mean<'a>(given: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    let given = given.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (distance(&given, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn set_once(slot: &mut Option<LitStr>, meta: &syn::meta::ParseNestedMeta) -> syn::Result<()> {
    if slot.is_some() {
        let key = quote::ToTokens::to_token_stream(&meta.path).to_string();
        return Err(meta.error(format!("`{key}` is given twice; keep one")));
    }
    *slot = Some(meta.value()?.parse()?);
    Ok(())
}

/// How a `#[sensitive]` field is masked in `Debug` output.
enum Mask {
    Full,
    Card,
    Email,
}

struct FieldInfo {
    member: Member,
    ty: syn::Type,
    mask: Option<Mask>,
}

pub fn expand(kind: Kind, args: TokenStream, input: TokenStream) -> syn::Result<TokenStream> {
    let args = parse_args(kind, args)?;
    let mut item: DeriveInput = syn::parse2(input).map_err(|e| {
        syn::Error::new(
            e.span(),
            format!(
                "#[{0}] declares a message type, so it goes on a struct or an enum; \
                 to handle {1} {0}, mark an `async fn` taking it with #[handler]",
                kind.attr(),
                match kind {
                    Kind::Command => "a",
                    Kind::Event => "an",
                }
            ),
        )
    })?;
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &item.generics,
            "message types cannot be generic: each wire name must map to one concrete type",
        ));
    }

    let (dest, dest_lit) = match kind {
        Kind::Command => match &args.queue {
            Some(q) => (q.value(), q.clone()),
            None => {
                return Err(syn::Error::new(
                    Span::call_site(),
                    "#[command] needs the queue it is sent to: `#[command(queue = \"orders\")]` \
                     (add a `.fifo` suffix for a FIFO queue)",
                ))
            }
        },
        Kind::Event => match &args.topic {
            Some(t) => (t.value(), t.clone()),
            None => {
                return Err(syn::Error::new(
                    Span::call_site(),
                    "#[event] needs the topic it is published to: `#[event(topic = \"order-events\")]` \
                     (add a `.fifo` suffix for a FIFO topic)",
                ))
            }
        },
    };
    let fifo = match kind {
        Kind::Command => names::check_queue(&dest),
        Kind::Event => names::check_topic(&dest),
    }
    .map_err(|msg| syn::Error::new(dest_lit.span(), msg))?;
    args.options.check_fifo(Some(fifo))?;

    let ident = item.ident.clone();
    let wire_name = match &args.name {
        Some(n) => {
            names::check_wire_name(&n.value()).map_err(|m| syn::Error::new(n.span(), m))?;
            n.value()
        }
        None => ident.to_string(),
    };

    // Collect field roles and strip our helper attributes (they are not real attributes).
    let mut entity: Option<FieldInfo> = None;
    let mut sensitive_any = false;
    let mut debug_fields: Vec<Vec<FieldInfo>> = Vec::new();
    match &mut item.data {
        Data::Struct(s) => {
            let infos = scan_fields(&mut s.fields, &mut entity, true)?;
            sensitive_any |= infos.iter().any(|f| f.mask.is_some());
            debug_fields.push(infos);
        }
        Data::Enum(e) => {
            for v in &mut e.variants {
                let infos = scan_fields(&mut v.fields, &mut entity, false)?;
                sensitive_any |= infos.iter().any(|f| f.mask.is_some());
                debug_fields.push(infos);
            }
        }
        Data::Union(u) => {
            return Err(syn::Error::new_spanned(
                u.union_token,
                format!(
                    "#[{}] goes on a struct or an enum, not a union",
                    kind.attr()
                ),
            ))
        }
    }

    if fifo && entity.is_none() {
        let what = match kind {
            Kind::Command => "queue",
            Kind::Event => "topic",
        };
        let fix = if matches!(item.data, Data::Enum(_)) {
            "enums cannot carry an #[entity_id]: use a struct for a FIFO route, or drop the `.fifo` suffix"
                .to_string()
        } else {
            "mark the field that identifies the entity with #[entity_id], or drop the `.fifo` \
             suffix for a standard (unordered) route"
                .to_string()
        };
        return Err(syn::Error::new(
            dest_lit.span(),
            format!(
                "FIFO {what} `{dest}` needs an #[entity_id] field: its value becomes the \
                 MessageGroupId that keeps one entity's messages in order; {fix}"
            ),
        ));
    }

    // A derived Debug would print #[sensitive] fields: replace it with a masking impl.
    let mut debug_impl = TokenStream::new();
    if sensitive_any && remove_derive(&mut item.attrs, "Debug") {
        debug_impl = masked_debug(&item, &debug_fields);
    }

    // A type deriving `JsonSchema` registers its payload schema for the AsyncAPI export.
    // Its derive is pointed at the schemars that sourceflow re-exports, so that users need
    // no schemars dependency of their own (and one of theirs, of the same major version,
    // is the same crate).
    let derives_schema = has_derive(&item.attrs, "JsonSchema");
    if derives_schema && !has_schemars_crate(&item.attrs) {
        item.attrs
            .push(syn::parse_quote!(#[schemars(crate = "::sourceflow::schemars")]));
    }
    let schema = match derives_schema {
        true => quote!(.with_schema(::sourceflow::__private::schema_of::<#ident>)),
        false => TokenStream::new(),
    };

    let kind_tokens = match kind {
        Kind::Command => quote!(::sourceflow::MessageKind::Command),
        Kind::Event => quote!(::sourceflow::MessageKind::Event),
    };
    let (entity_fn, has_entity) = match &entity {
        Some(f) => {
            let member = &f.member;
            let ty = &f.ty;
            // Qualified with the field's type and spanned at it, so a type that is not an
            // `EntityId` is reported once, at that type.
            let to_id = quote_spanned! {ty.span()=>
                <#ty as ::sourceflow::EntityId>::to_entity_id(&self.#member)
            };
            (
                quote! {
                    fn entity_id(&self) -> ::core::option::Option<::std::string::String> {
                        ::core::option::Option::Some(#to_id)
                    }
                },
                true,
            )
        }
        None => (
            quote! {
                fn entity_id(&self) -> ::core::option::Option<::std::string::String> {
                    ::core::option::Option::None
                }
            },
            false,
        ),
    };
    // Spanned at the type's name: rustc's "`Command` is implemented for `X`" hints then
    // point at `X`, not at the whole attribute.
    let marker = match kind {
        Kind::Command => quote_spanned!(ident.span()=> impl ::sourceflow::Command for #ident {}),
        Kind::Event => quote_spanned!(ident.span()=> impl ::sourceflow::Event for #ident {}),
    };
    let type_name = ident.to_string();
    let encrypt = args.encrypt;
    let queue_options = if args.options.any() {
        let o = args.options.tokens();
        quote!(const QUEUE_OPTIONS: ::sourceflow::__private::QueueOptions = #o;)
    } else {
        TokenStream::new()
    };

    Ok(quote! {
        #item

        #debug_impl

        impl ::sourceflow::Message for #ident {
            const NAME: &'static str = #wire_name;
            const KIND: ::sourceflow::MessageKind = #kind_tokens;
            const DESTINATION: &'static str = #dest;
            const FIFO: bool = #fifo;
            const HAS_ENTITY_ID: bool = #has_entity;
            const ENCRYPT: bool = #encrypt;
            #queue_options
            #entity_fn
        }

        #marker

        ::sourceflow::__private::inventory::submit! {
            ::sourceflow::__private::MessageRoute::of::<#ident>(::core::module_path!(), #type_name)
                #schema
        }
    })
}

fn scan_fields(
    fields: &mut Fields,
    entity: &mut Option<FieldInfo>,
    in_struct: bool,
) -> syn::Result<Vec<FieldInfo>> {
    let mut out = Vec::new();
    for (index, field) in fields.iter_mut().enumerate() {
        let member = match &field.ident {
            Some(i) => Member::Named(i.clone()),
            None => Member::Unnamed(syn::Index::from(index)),
        };
        let mut mask = None;
        let mut is_entity = false;
        let mut keep = Vec::new();
        for attr in field.attrs.drain(..) {
            if attr.path().is_ident("entity_id") {
                if !matches!(attr.meta, syn::Meta::Path(_)) {
                    return Err(syn::Error::new_spanned(
                        &attr,
                        "#[entity_id] takes no arguments",
                    ));
                }
                if !in_struct {
                    return Err(syn::Error::new_spanned(
                        &attr,
                        "#[entity_id] is only supported on struct fields: an enum variant's \
                         field may be absent from other variants",
                    ));
                }
                if let Some(first) = entity.as_ref() {
                    let first = match &first.member {
                        Member::Named(i) => format!("`{i}`"),
                        Member::Unnamed(i) => format!("field {}", i.index),
                    };
                    return Err(syn::Error::new_spanned(
                        &attr,
                        format!(
                            "only one field can be #[entity_id] (the FIFO message group), and \
                             {first} already is; remove one of them"
                        ),
                    ));
                }
                if mask.is_some() {
                    return Err(syn::Error::new_spanned(
                        &attr,
                        "an #[entity_id] travels in clear (it is the FIFO MessageGroupId and a message attribute), so it cannot be #[sensitive]: identify the entity by a non-sensitive id",
                    ));
                }
                is_entity = true;
            } else if attr.path().is_ident("sensitive") {
                if is_entity {
                    return Err(syn::Error::new_spanned(
                        &attr,
                        "an #[entity_id] travels in clear (it is the FIFO MessageGroupId and a message attribute), so it cannot be #[sensitive]: identify the entity by a non-sensitive id",
                    ));
                }
                mask = Some(parse_mask(&attr)?);
            } else {
                keep.push(attr);
            }
        }
        field.attrs = keep;
        let info = FieldInfo {
            member,
            ty: field.ty.clone(),
            mask,
        };
        if is_entity {
            *entity = Some(FieldInfo {
                member: info.member.clone(),
                ty: info.ty.clone(),
                mask: None,
            });
        }
        out.push(info);
    }
    Ok(out)
}

fn parse_mask(attr: &Attribute) -> syn::Result<Mask> {
    match &attr.meta {
        syn::Meta::Path(_) => Ok(Mask::Full),
        syn::Meta::List(list) => {
            let kind: syn::Ident = list.parse_args()?;
            match kind.to_string().as_str() {
                "card" => Ok(Mask::Card),
                "email" => Ok(Mask::Email),
                _ => Err(syn::Error::new_spanned(
                    kind,
                    "unknown mask kind; expected `#[sensitive]`, `#[sensitive(card)]` or `#[sensitive(email)]`",
                )),
            }
        }
        syn::Meta::NameValue(_) => Err(syn::Error::new_spanned(
            attr,
            "expected `#[sensitive]`, `#[sensitive(card)]` or `#[sensitive(email)]`",
        )),
    }
}

/// The derive paths of every `#[derive(...)]` list.
fn derives(attrs: &[Attribute]) -> Vec<Path> {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("derive"))
        .filter_map(|a| {
            a.parse_args_with(Punctuated::<Path, Token![,]>::parse_terminated)
                .ok()
        })
        .flatten()
        .collect()
}

/// True when a `#[derive(...)]` list names `name` (as `name` or `some::path::name`).
fn has_derive(attrs: &[Attribute], name: &str) -> bool {
    derives(attrs)
        .iter()
        .any(|p| p.segments.last().is_some_and(|s| s.ident == name))
}

/// True when a `#[schemars(...)]` attribute already names the crate.
fn has_schemars_crate(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("schemars")
            && a.parse_nested_meta(|m| {
                if m.path.is_ident("crate") {
                    return Err(m.error("found"));
                }
                // Skip the value of other keys.
                if m.input.peek(Token![=]) {
                    let _: syn::Expr = m.value()?.parse()?;
                } else if m.input.peek(syn::token::Paren) {
                    let _content;
                    syn::parenthesized!(_content in m.input);
                }
                Ok(())
            })
            .is_err()
    })
}

/// Removes `name` from every `#[derive(...)]` list; true when it was there.
fn remove_derive(attrs: &mut Vec<Attribute>, name: &str) -> bool {
    let mut found = false;
    let mut out = Vec::with_capacity(attrs.len());
    for attr in attrs.drain(..) {
        if attr.path().is_ident("derive") {
            if let Ok(paths) = attr.parse_args_with(Punctuated::<Path, Token![,]>::parse_terminated)
            {
                let before = paths.len();
                let kept: Punctuated<Path, Token![,]> = paths
                    .into_iter()
                    .filter(|p| p.segments.last().is_none_or(|s| s.ident != name))
                    .collect();
                if kept.len() != before {
                    found = true;
                    if !kept.is_empty() {
                        out.push(syn::parse_quote!(#[derive(#kept)]));
                    }
                    continue;
                }
            }
        }
        out.push(attr);
    }
    *attrs = out;
    found
}

fn field_value(f: &FieldInfo, access: TokenStream) -> TokenStream {
    match f.mask {
        None => access,
        Some(Mask::Full) => quote!(&::sourceflow::sensitive::Redacted),
        Some(Mask::Card) => quote!(&::sourceflow::sensitive::MaskedCard(#access)),
        Some(Mask::Email) => quote!(&::sourceflow::sensitive::MaskedEmail(#access)),
    }
}

fn debug_body(
    name: &str,
    fields: &[FieldInfo],
    named: bool,
    bind: &dyn Fn(usize, &FieldInfo) -> TokenStream,
) -> TokenStream {
    if named {
        let entries = fields.iter().enumerate().map(|(i, f)| {
            let label = match &f.member {
                Member::Named(id) => id.to_string(),
                Member::Unnamed(ix) => ix.index.to_string(),
            };
            let value = field_value(f, bind(i, f));
            quote!(.field(#label, #value))
        });
        quote!(f.debug_struct(#name) #(#entries)* .finish())
    } else {
        let entries = fields.iter().enumerate().map(|(i, f)| {
            let value = field_value(f, bind(i, f));
            quote!(.field(#value))
        });
        quote!(f.debug_tuple(#name) #(#entries)* .finish())
    }
}

fn masked_debug(item: &DeriveInput, fields: &[Vec<FieldInfo>]) -> TokenStream {
    let ident = &item.ident;
    let body = match &item.data {
        Data::Struct(s) => {
            let named = matches!(s.fields, Fields::Named(_));
            let name = ident.to_string();
            debug_body(&name, &fields[0], named, &|_, f| {
                let m = &f.member;
                quote!(&self.#m)
            })
        }
        Data::Enum(e) => {
            let arms = e.variants.iter().zip(fields).map(|(v, infos)| {
                let vname = &v.ident;
                let label = vname.to_string();
                let binds: Vec<_> = (0..infos.len())
                    .map(|i| format_ident!("__f{}", i))
                    .collect();
                match &v.fields {
                    Fields::Named(_) => {
                        let members = infos.iter().map(|f| &f.member);
                        let body = debug_body(&label, infos, true, &|i, _| {
                            let b = &binds[i];
                            quote!(#b)
                        });
                        quote!(Self::#vname { #(#members: #binds),* } => #body)
                    }
                    Fields::Unnamed(_) => {
                        let body = debug_body(&label, infos, false, &|i, _| {
                            let b = &binds[i];
                            quote!(#b)
                        });
                        quote!(Self::#vname ( #(#binds),* ) => #body)
                    }
                    Fields::Unit => quote!(Self::#vname => f.write_str(#label)),
                }
            });
            quote!(match self { #(#arms,)* })
        }
        Data::Union(_) => quote!(::core::result::Result::Ok(())),
    };
    quote! {
        impl ::core::fmt::Debug for #ident {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                #body
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn suggests_close_arguments_only() {
        let known = ["queue", "name", "encrypt"];
        assert_eq!(did_you_mean("queu", &known), Some("queue"));
        assert_eq!(did_you_mean("Queue", &known), Some("queue"));
        assert_eq!(did_you_mean("nmae", &known), Some("name"));
        assert_eq!(did_you_mean("encrpyt", &known), Some("encrypt"));
        assert_eq!(did_you_mean("group", &known), None);
        assert_eq!(did_you_mean("", &known), None);
    }
}
