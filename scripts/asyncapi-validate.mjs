// Validates an AsyncAPI document with the official parser (@asyncapi/parser), installed by
// scripts/brokers.sh (install_asyncapi_parser) into $ASYNCAPI_PARSER_DIR.
// Usage: ASYNCAPI_PARSER_DIR=dir node scripts/asyncapi-validate.mjs document.json
// Prints the diagnostics; exits 1 when the document has errors.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const require = createRequire(`${process.env.ASYNCAPI_PARSER_DIR}/`);
const { Parser } = require('@asyncapi/parser');

const text = readFileSync(process.argv[2], 'utf8');
const { document, diagnostics } = await new Parser().parse(text);
const severity = ['error', 'warning', 'info', 'hint'];
for (const d of diagnostics) {
  console.error(`${severity[d.severity]}: ${d.message} (at ${d.path.join('.') || '/'})`);
}
if (!document || diagnostics.some((d) => d.severity === 0)) {
  console.error('the AsyncAPI document is not valid');
  process.exit(1);
}
console.log(
  `valid AsyncAPI ${document.version()} document: ${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${document.messages().length} messages`,
);
