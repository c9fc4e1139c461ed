// `hymba perplexity`: sliding-window perplexity of a text file (see
// runtime/perplexity.h for the exact definition).
#pragma once

namespace CLI {
class App;
}

namespace hymba::cli {

// Registers the subcommand. It runs from its own callback during
// app.parse(): on success it ends parsing with CLI::RuntimeError(0) (exit
// status 0, nothing printed by app.exit); on a hymba::Error it prints
// "error: ..." to stderr and ends with CLI::RuntimeError(1).
void add_perplexity_command(CLI::App& app);

}  // namespace hymba::cli
