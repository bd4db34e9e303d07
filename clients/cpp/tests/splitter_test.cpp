// Test 7: the line splitter keeps every character whole, however the bytes arrive.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "mlx_worker/line_splitter.hpp"

using mlx_worker::LineSplitter;

namespace {

std::vector<std::string> split_in_chunks(const std::string& stream, std::mt19937& rng, int max_chunk) {
  LineSplitter splitter;
  std::vector<std::string> lines;
  std::uniform_int_distribution<int> size(1, max_chunk);
  for (std::size_t at = 0; at < stream.size();) {
    std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(size(rng)), stream.size() - at);
    splitter.feed(stream.data() + at, n, [&](std::string_view line) { lines.emplace_back(line); });
    at += n;
  }
  EXPECT_EQ(splitter.pending(), 0u);
  return lines;
}

}  // namespace

TEST(LineSplitter, MultiByteCharactersSurviveAnySplit) {
  // 2-, 3- and 4-byte characters, U+FFFD, an empty line, a long line.
  std::vector<std::string> expected = {
      R"({"text":"héllo wörld"})", R"({"text":"日本語 — ½"})", R"({"text":"🙂🚀 \uD83D\uDE00"})",
      "{\"text\":\"\xEF\xBF\xBD\xEF\xBF\xBD\"}", "", std::string(70000, 'x') + "é"};
  std::string stream;
  for (const auto& line : expected) stream += line + "\n";

  std::mt19937 rng(1234);
  EXPECT_EQ(split_in_chunks(stream, rng, 1), expected);  // byte by byte
  for (int round = 0; round < 50; ++round) {
    EXPECT_EQ(split_in_chunks(stream, rng, 1 + round * 7), expected) << "round " << round;
  }
}

TEST(LineSplitter, HoldsAnUnfinishedLine) {
  LineSplitter splitter;
  std::vector<std::string> lines;
  auto collect = [&](std::string_view line) { lines.emplace_back(line); };
  splitter.feed("ab\xC3", 3, collect);
  EXPECT_TRUE(lines.empty());
  EXPECT_EQ(splitter.pending(), 3u);
  splitter.feed("\xA9\ncd", 4, collect);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0], "ab\xC3\xA9");
  EXPECT_EQ(splitter.pending(), 2u);
}
