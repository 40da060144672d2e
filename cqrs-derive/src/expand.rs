//! Code generation.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::DeriveInput;

use crate::attr::{Errors, Kind};
use crate::check::check;

/// Expands the derive; on errors, the errors plus a stub impl so that uses of the type do not add
/// more errors.
pub fn derive(input: &DeriveInput, kind: Kind) -> TokenStream {
    let mut errors = Errors::default();
    let (checked, krate) = check(input, kind, &mut errors);
    let krate = krate.map(|p| quote!(#p)).unwrap_or_else(|| quote!(::cqrs));
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let trait_ = format_ident!("{}", kind.trait_name());
    let trait_path = quote!(#krate::__private::#trait_);

    if let Err(e) = errors.into_result() {
        let compile_errors = e.to_compile_error();
        return quote! {
            #compile_errors
            const _: () = {
                impl #impl_generics #trait_path for #ident #ty_generics #where_clause {
                    const NAME: &'static str = "";
                }
            };
        };
    }

    let name = &checked.name;
    let topic = match &checked.topic {
        Some(t) => quote!(::core::option::Option::Some(#t)),
        None => quote!(::core::option::Option::None),
    };
    let version = checked.version;
    let key = checked.key.map(|member| {
        quote! {
            fn key(&self) -> ::core::option::Option<#krate::__private::String> {
                ::core::option::Option::Some(#krate::__private::ToString::to_string(&self.#member))
            }
        }
    });
    let p = quote!(#krate::__private);
    let upcast = checked.upcast_from.as_ref().map(|prev| {
        quote! {
            fn upcast(
                version: u32,
                payload: &[u8],
            ) -> ::core::option::Option<::core::result::Result<Self, #p::CodecError>> {
                const _: () = ::core::assert!(
                    <#prev as #p::Event>::VERSION < #version,
                    "`upcast_from` names a type whose version is not lower than this one's"
                );
                if version == <#prev as #p::Event>::VERSION {
                    ::core::option::Option::Some(
                        <#p::DefaultCodec as #p::Codec<#prev>>::decode(&#p::DefaultCodec::default(), payload)
                            .map(<Self as ::core::convert::From<#prev>>::from),
                    )
                } else {
                    <#prev as #p::Event>::upcast(version, payload)
                        .map(|r| r.map(<Self as ::core::convert::From<#prev>>::from))
                }
            }
        }
    });
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #impl_generics #trait_path for #ident #ty_generics #where_clause {
                const NAME: &'static str = #name;
                const TOPIC: ::core::option::Option<&'static str> = #topic;
                const VERSION: u32 = #version;
                #key
                #upcast
            }
        };
    }
}
