#include <iostream>

#include "mlx_worker/client.hpp"

int main(int argc, char** argv) {  // example PYTHON MODEL_DIR (run from the mlx-worker checkout)
  mlx_worker::SpawnOptions options;
  options.python = argc > 1 ? argv[1] : "python3";
  auto worker = mlx_worker::Client::spawn(options);
  worker->load(argc > 2 ? argv[2] : "fixtures/models/tiny-llama");

  mlx_worker::GenerateParams params;
  mlx_worker::ChatMessage message;
  message.role = "user";
  message.content = "Tell me a story.";
  params.messages = {message};
  params.max_tokens = 20;
  auto result = worker->generate(params, [](const mlx_worker::GenerateEvent& event) {
    if (auto* token = std::get_if<mlx_worker::TokenEvent>(&event)) std::cout << token->text << std::flush;
  });
  std::cout << "\n[" << result.stop_reason << ", " << result.usage.completion_tokens << " tokens]\n";
  return worker->close().exit_code.value_or(1);
}
