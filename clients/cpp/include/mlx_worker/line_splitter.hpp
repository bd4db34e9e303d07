// Splits a byte stream into lines on the byte '\n'.
//
// Splitting happens on bytes, before any decoding: 0x0A never occurs inside a UTF-8
// multi-byte sequence, so a character split across two reads stays whole.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace mlx_worker {

class LineSplitter {
 public:
  // Appends bytes and calls on_line(std::string_view) for every line they complete
  // (without its '\n'; a trailing '\r' is kept, JSON treats it as whitespace).
  template <class OnLine>
  void feed(const char* data, std::size_t size, OnLine&& on_line) {
    std::string_view chunk(data, size);
    while (!chunk.empty()) {
      std::size_t nl = chunk.find('\n');
      if (nl == std::string_view::npos) {
        buffer_.append(chunk);
        return;
      }
      if (buffer_.empty()) {
        on_line(chunk.substr(0, nl));
      } else {
        buffer_.append(chunk.substr(0, nl));
        std::string line;
        line.swap(buffer_);
        on_line(std::string_view(line));
      }
      chunk.remove_prefix(nl + 1);
    }
  }

  // Bytes of an unfinished line held so far.
  std::size_t pending() const { return buffer_.size(); }

 private:
  std::string buffer_;
};

}  // namespace mlx_worker
