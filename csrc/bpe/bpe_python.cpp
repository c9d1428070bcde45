// fastlm._bpe: the thin pybind11 layer over the torch-free tokenizer core.
//
// Conversions happen here and nowhere else: Python str -> UTF-8 (zero-copy: CPython caches the
// UTF-8 form in the str object), token lists -> Python lists. Native work runs with the GIL
// released, so Python threads and the batch functions' own threads run in parallel.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bpe/bpe_encoder.h"
#include "bpe/bpe_split.h"
#include "bpe/bpe_trainer.h"

namespace py = pybind11;
using namespace fastlm::bpe;

namespace {

// The UTF-8 bytes of a Python str, valid while the str lives. Lone surrogates (which no UTF-8 can
// hold) raise ValueError naming the first one and its index.
std::string_view utf8_of(py::handle obj) {
  if (!PyUnicode_Check(obj.ptr()))
    throw py::type_error(std::string("expected str, got ") + Py_TYPE(obj.ptr())->tp_name);
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (data) return std::string_view(data, static_cast<size_t>(size));
  PyErr_Clear();
  Py_ssize_t n = PyUnicode_GetLength(obj.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_UCS4 c = PyUnicode_ReadChar(obj.ptr(), i);
    if (c >= 0xD800 && c <= 0xDFFF) {
      char buf[160];
      std::snprintf(buf, sizeof buf,
                    "text contains a lone surrogate U+%04X at index %zd; it is not a Unicode "
                    "character and cannot be encoded as UTF-8 (clean the text, e.g. "
                    "s.encode('utf-8', 'replace').decode())",
                    static_cast<unsigned>(c), static_cast<Py_ssize_t>(i));
      throw py::value_error(buf);
    }
  }
  throw py::value_error("text cannot be encoded as UTF-8");
}

std::string_view bytes_of(const py::bytes& b) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  PyBytes_AsStringAndSize(b.ptr(), &data, &size);
  return std::string_view(data, static_cast<size_t>(size));
}

// Python ints for token ids, made once and shared (ints are immutable): building a list of ids
// then costs a reference count per token instead of an allocation. Ids below kCachedIds are kept
// for the life of the process (at most ~8 MB, for a 256k vocabulary); larger ones are made anew.
// Touched only with the GIL held.
constexpr uint32_t kCachedIds = 1u << 18;
std::vector<PyObject*>& id_ints() {
  static std::vector<PyObject*>* ints = new std::vector<PyObject*>();  // never freed, like the ints
  return *ints;
}

PyObject* id_int(uint32_t id) {
  if (id >= kCachedIds) return PyLong_FromUnsignedLong(id);
  std::vector<PyObject*>& ints = id_ints();
  if (id >= ints.size()) ints.resize(std::min<size_t>(kCachedIds, 2 * size_t(id) + 1), nullptr);
  PyObject*& slot = ints[id];
  if (!slot && !(slot = PyLong_FromUnsignedLong(id))) return nullptr;
  Py_INCREF(slot);
  return slot;
}

py::list to_list(const std::vector<uint32_t>& ids) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
  if (!list) throw py::error_already_set();
  for (size_t i = 0; i < ids.size(); ++i) {
    PyObject* v = id_int(ids[i]);
    if (!v) {
      Py_DECREF(list);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
  }
  return py::reinterpret_steal<py::list>(list);
}

// Turns the cyclic garbage collector off for a scope (when it was on); Python >= 3.10.
class GcPause {
 public:
  GcPause() {
#if PY_VERSION_HEX >= 0x030A0000
    was_enabled_ = PyGC_Disable();
#endif
  }
  ~GcPause() {
#if PY_VERSION_HEX >= 0x030A0000
    if (was_enabled_) PyGC_Enable();
#endif
  }
  GcPause(const GcPause&) = delete;
  GcPause& operator=(const GcPause&) = delete;

 private:
  int was_enabled_ = 0;
};

// encode_batch as a list of lists. Making Python lists needs the GIL, so it is serial work
// (~15% of a batch's time on one thread); on 2+ threads it overlaps the encoding: the workers run without the
// GIL and this thread turns each finished text into its list, in order, as soon as it is ready.
py::list encode_batch_to_lists(const Encoder& e, const std::vector<std::string_view>& views,
                               const SpecialMatcher& allowed, const SpecialMatcher& disallowed,
                               int threads) {
  const size_t n = views.size();
  std::vector<std::vector<uint32_t>> out(n);
  // Thousands of new lists would set off the cyclic GC many times over, each pass walking every
  // id of the young lists (~15% of a batch's time); lists of ints hold no cycles, so collect
  // after building them instead.
  GcPause pause;
  py::list result(n);
  if (resolve_threads(threads, n) <= 1) {
    {
      py::gil_scoped_release release;
      e.encode_batch_into(views, allowed, disallowed, 1, &out, nullptr);
    }
    for (size_t i = 0; i < n; ++i) result[i] = to_list(out[i]);
    return result;
  }
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<uint8_t> ready(n, 0);
  bool finished = false;
  std::exception_ptr error;
  std::thread runner([&] {
    try {
      e.encode_batch_into(views, allowed, disallowed, threads, &out, [&](size_t i) {
        std::lock_guard<std::mutex> lock(mutex);
        ready[i] = 1;
        cv.notify_one();
      });
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex);
    finished = true;
    cv.notify_one();
  });
  // Joins the runner on every way out (a Python error while building a list included).
  struct Joiner {
    std::thread& t;
    ~Joiner() {
      py::gil_scoped_release release;
      t.join();
    }
  } joiner{runner};
  for (size_t i = 0; i < n; ++i) {
    bool ok;
    {
      std::lock_guard<std::mutex> lock(mutex);
      ok = ready[i];
    }
    if (!ok) {
      py::gil_scoped_release release;  // never wait for the workers holding the GIL
      std::unique_lock<std::mutex> lock(mutex);  // (and never take the GIL holding the lock)
      cv.wait(lock, [&] { return ready[i] || finished; });
      ok = ready[i];
    }
    if (!ok) break;  // a text failed: its error is raised below
    result[i] = to_list(out[i]);
    std::vector<uint32_t>().swap(out[i]);  // its list holds the ids now
  }
  {
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return finished; });
  }
  if (error) std::rethrow_exception(error);
  return result;
}

// Token ids from a list/tuple (fast path) or any iterable of ints.
std::vector<uint32_t> ids_of(py::handle obj) {
  std::vector<uint32_t> ids;
  auto push = [&](PyObject* item) {
    long long v = PyLong_AsLongLong(item);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      throw py::type_error(std::string("token ids must be ints, got ") + Py_TYPE(item)->tp_name);
    }
    if (v < 0 || v > 0xFFFFFFFFll)
      throw py::value_error("token id " + std::to_string(v) + " is not in the vocabulary");
    ids.push_back(static_cast<uint32_t>(v));
  };
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    PyObject* seq = obj.ptr();
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    ids.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) push(items[i]);
  } else {
    for (py::handle item : py::iter(obj)) push(item.ptr());
  }
  return ids;
}

std::vector<std::string> strings_of_bytes(const std::vector<py::bytes>& list) {
  std::vector<std::string> out;
  out.reserve(list.size());
  for (const auto& b : list) out.emplace_back(bytes_of(b));
  return out;
}

py::list pieces_to_list(std::string_view s, Pattern p, bool as_str) {
  py::list out;
  const auto* d = reinterpret_cast<const uint8_t*>(s.data());
  split(p, d, s.size(), [&](size_t off, size_t len) {
    if (as_str)
      out.append(py::str(s.data() + off, len));
    else
      out.append(py::bytes(s.data() + off, len));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "fastlm's native byte-level BPE tokenizer (torch-free; see fastlm.tokenizer)";
  py::register_exception<DisallowedSpecialError>(m, "DisallowedSpecialError", PyExc_ValueError);

  m.attr("GPT2_REGEX") = kGpt2Regex;
  m.attr("GPT4_REGEX") = kGpt4Regex;

  m.def(
      "split",
      [](py::handle text, const std::string& pattern) {
        Pattern p = parse_pattern(pattern);
        if (PyBytes_Check(text.ptr()))
          return pieces_to_list(bytes_of(py::reinterpret_borrow<py::bytes>(text)), p, false);
        return pieces_to_list(utf8_of(text), p, true);
      },
      py::arg("text"), py::arg("pattern"),
      "Pre-tokenize str (-> list[str]) or bytes (-> list[bytes]) with 'gpt2', 'gpt4' or 'none'.");

  py::class_<SpecialMatcher>(m, "SpecialMatcher", "A set of special tokens to look for.");

  py::class_<Encoder, std::shared_ptr<Encoder>>(m, "Encoder")
      .def(py::init([](const std::vector<py::bytes>& tokens, const std::vector<uint32_t>& specials,
                       const std::string& pattern) {
             return std::make_shared<Encoder>(strings_of_bytes(tokens), specials,
                                              parse_pattern(pattern));
           }),
           py::arg("tokens"), py::arg("special_ids"), py::arg("pattern"))
      .def_property_readonly("vocab_size", &Encoder::vocab_size)
      .def("matcher", &Encoder::matcher, py::arg("ids"), py::arg("all") = false,
           "A SpecialMatcher for these special ids (all of them when all=True).")
      .def(
          "encode",
          [](const Encoder& e, py::handle text, const SpecialMatcher& allowed,
             const SpecialMatcher& disallowed) {
            std::string_view s = utf8_of(text);
            std::vector<uint32_t> ids;
            {
              py::gil_scoped_release release;
              ids.reserve(s.size() / 3 + 1);
              e.encode(reinterpret_cast<const uint8_t*>(s.data()), s.size(), allowed, disallowed,
                       &ids);
            }
            return to_list(ids);
          },
          py::arg("text"), py::arg("allowed"), py::arg("disallowed"))
      .def(
          "encode_ordinary",
          [](const Encoder& e, py::handle text) {
            std::string_view s = utf8_of(text);
            std::vector<uint32_t> ids;
            {
              py::gil_scoped_release release;
              ids.reserve(s.size() / 3 + 1);
              e.encode_ordinary(reinterpret_cast<const uint8_t*>(s.data()), s.size(), &ids);
            }
            return to_list(ids);
          },
          py::arg("text"))
      .def(
          "encode_bytes",
          [](const Encoder& e, const py::bytes& data) {
            std::string_view s = bytes_of(data);
            std::vector<uint32_t> ids;
            {
              py::gil_scoped_release release;
              e.encode_ordinary(reinterpret_cast<const uint8_t*>(s.data()), s.size(), &ids);
            }
            return to_list(ids);
          },
          py::arg("data"), "Encode raw bytes (any bytes, valid UTF-8 or not) as plain text.")
      .def(
          "encode_batch",
          [](const Encoder& e, const py::list& texts, const SpecialMatcher& allowed,
             const SpecialMatcher& disallowed, int threads) {
            std::vector<std::string_view> views;
            views.reserve(texts.size());
            for (py::handle t : texts) views.push_back(utf8_of(t));
            return encode_batch_to_lists(e, views, allowed, disallowed, threads);
          },
          py::arg("texts"), py::arg("allowed"), py::arg("disallowed"), py::arg("threads") = 0)
      .def(
          "decode_bytes",
          [](const Encoder& e, py::handle ids) {
            std::vector<uint32_t> v = ids_of(ids);
            std::string s;
            {
              py::gil_scoped_release release;
              s = e.decode(v.data(), v.size());
            }
            return py::bytes(s);
          },
          py::arg("ids"))
      .def("token_bytes",
           [](const Encoder& e, uint32_t id) { return py::bytes(e.token_bytes(id)); })
      .def("token_id", [](const Encoder& e, const py::bytes& b) { return e.token_id(bytes_of(b)); },
           "The id of the regular token with these bytes, or -1.");

  py::class_<PretokenCounter>(m, "Trainer",
                              "Counts pre-tokens of streamed text, then learns BPE merges.")
      .def(py::init([](const std::string& pattern, const std::vector<std::string>& specials,
                       int threads, size_t block_bytes) {
             return std::make_unique<PretokenCounter>(parse_pattern(pattern), specials, threads,
                                                      block_bytes);
           }),
           py::arg("pattern"), py::arg("special_tokens"), py::arg("threads") = 0,
           py::arg("block_bytes") = size_t(1) << 20)
      .def_property_readonly("threads", &PretokenCounter::threads)
      .def_property_readonly("bytes_counted", &PretokenCounter::bytes_counted)
      .def(
          "feed",
          [](PretokenCounter& c, const py::bytes& data) {
            std::string_view s = bytes_of(data);
            py::gil_scoped_release release;
            c.feed(reinterpret_cast<const uint8_t*>(s.data()), s.size());
          },
          py::arg("data"), "The next bytes of the current document.")
      .def("end_document", &PretokenCounter::end_document,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "feed_texts",
          [](PretokenCounter& c, const py::list& texts) {
            std::vector<std::string_view> views;
            views.reserve(texts.size());
            for (py::handle t : texts) views.push_back(utf8_of(t));
            py::gil_scoped_release release;
            c.feed_documents(views);
          },
          py::arg("texts"), "Whole documents (str), counted in parallel.")
      .def("counts",
           [](PretokenCounter& c) {
             BytesMap<int64_t> counts;
             {
               py::gil_scoped_release release;
               counts = c.merged_counts();
             }
             py::dict out;
             counts.for_each([&](const uint8_t* p, size_t n, int64_t v) {
               out[py::bytes(reinterpret_cast<const char*>(p), n)] = v;
             });
             return out;
           },
           "The pre-token counts (consumes them: call once, instead of train).")
      .def(
          "train",
          [](PretokenCounter& c, size_t n_new_tokens, std::function<void(size_t)> progress) {
            TrainResult r;
            {
              py::gil_scoped_release release;
              BytesMap<int64_t> counts = c.merged_counts();
              std::function<void(size_t)> report;
              if (progress)
                report = [&](size_t n) {
                  py::gil_scoped_acquire acquire;
                  progress(n);
                };
              r = learn_merges(std::move(counts), n_new_tokens, report);
            }
            py::list tokens;
            for (const auto& t : r.tokens) tokens.append(py::bytes(t));
            return py::make_tuple(tokens, r.merges);
          },
          py::arg("n_new_tokens"), py::arg("progress") = nullptr,
          "Learn merges from everything fed: (tokens: list[bytes], merges: list[(int, int)]).");
}
