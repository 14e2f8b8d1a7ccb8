"""Sentence events: the segmenter's rules over many scripts and every chunking, the marks as daemon settings, and
real lines of the bundled model, free and structured, whose Sentence events follow the deltas and add up to the
text."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import grpc
import pytest
from server_helpers import RPC_TIMEOUT_S, SessionClient, engine_config, running_daemon, say, write_persona

from npcd.service import config as daemon_config
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.config import DaemonConfig, Limits
from npcd.service.sentences import CLAUSE_MARKS, SENTENCE_MARKS, Piece, Segmenter, marks_problem
from npcd.service.validation import RequestError, validate


def pieces(text: str, clauses: bool = False, **marks: str) -> list[str]:
    """The pieces of a line given whole, at its end."""
    return [p.text for p in Segmenter(clauses=clauses, **marks).finish(text)]


def streamed(chunks: list[str], clauses: bool = False) -> list[Piece]:
    segmenter = Segmenter(clauses=clauses)
    out = [p for chunk in chunks for p in segmenter.feed(chunk)]
    return out + segmenter.finish("".join(chunks))


@pytest.mark.parametrize("text, expected", [
    ("Hello there. How are you? Fine!", ["Hello there. ", "How are you? ", "Fine!"]),
    ("Run!! Now?! Go.", ["Run!! ", "Now?! ", "Go."]),
    ('"Stop!" he said. Then he left.', ['"Stop!" he said. ', "Then he left."]),  # a dialogue tag goes on
    ('(Yes!) and then? (no.) fine.', ["(Yes!) and then? ", "(no.) fine."]),
    ("(Loudly!) He ran.", ["(Loudly!) ", "He ran."]),
    ("\u201cStop!\u201d She ran.", ["\u201cStop!\u201d ", "She ran."]),
    ("It costs 3.5 gold. Fine.", ["It costs 3.5 gold. ", "Fine."]),
    ("Pi is 3.14159, or so.", ["Pi is 3.14159, or so."]),
    ("Mr. Smith met Dr. Who on St. Mark's day.", ["Mr. Smith met Dr. Who on St. Mark's day."]),
    ("Mrs. Jones, Ms. Lee, Prof. Oak, etc. came.", ["Mrs. Jones, Ms. Lee, Prof. Oak, etc. came."]),
    ("Fruit, e.g. apples, i.e. red ones, etc. are fine. Yes.", ["Fruit, e.g. apples, i.e. red ones, etc. are fine. ",
                                                                "Yes."]),
    ("At 9 a.m. the U.S. envoy came. He left.", ["At 9 a.m. the U.S. envoy came. ", "He left."]),
    ("J. R. R. Tolkien wrote it. Read it.", ["J. R. R. Tolkien wrote it. ", "Read it."]),
    ("On the 21st. Then we left.", ["On the 21st. ", "Then we left."]),
    ("Wait... what?", ["Wait... ", "what?"]),
    ("Wait...what? No\u2026 never.", ["Wait...what? ", "No\u2026 ", "never."]),
    ("Hello.\n\nGoodbye.\n", ["Hello.\n\n", "Goodbye.\n"]),
    ("  Leading space. Trailing space.   ", ["  Leading space. ", "Trailing space.   "]),
    ("Hello. ... World.", ["Hello. ... ", "World."]),
    ("Hello. \U0001f600 Bye.", ["Hello. \U0001f600 ", "Bye."]),
    ("Hello. (Quietly.) Bye.", ["Hello. ", "(Quietly.) ", "Bye."]),
    ("... and then. Done", ["... and then. ", "Done"]),
    ("Well. ...", ["Well. ..."]),
    ("...", ["..."]),
    ("No marks at all", ["No marks at all"]),
    ("", []),
    ("\u4f60\u597d\u3002\u6211\u5f88\u597d\uff01\u8c22\u8c22\uff1f", ["\u4f60\u597d\u3002", "\u6211\u5f88\u597d\uff01",
                                                                       "\u8c22\u8c22\uff1f"]),
    ("\u300c\u4f60\u597d\u3002\u300d\u4ed6\u8bf4\u3002", ["\u300c\u4f60\u597d\u3002\u300d", "\u4ed6\u8bf4\u3002"]),
    ("\u3053\u3093\u306b\u3061\u306f\u3002 \u5143\u6c17\uff1f", ["\u3053\u3093\u306b\u3061\u306f\u3002 ",
                                                                   "\u5143\u6c17\uff1f"]),
    ("10\uff1a30\u5230\u4e86\u3002", ["10\uff1a30\u5230\u4e86\u3002"]),
    ("\u0645\u0631\u062d\u0628\u0627\u061f \u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u061f",
     ["\u0645\u0631\u062d\u0628\u0627\u061f ", "\u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u061f"]),
    (("\u0928\u092e\u0938\u094d\u0924\u0947\u0964 \u0906\u092a \u0915\u0948\u0938\u0947 \u0939\u0948\u0902\u0965 "
      "\u0920\u0940\u0915"), ["\u0928\u092e\u0938\u094d\u0924\u0947\u0964 ",
                             "\u0906\u092a \u0915\u0948\u0938\u0947 \u0939\u0948\u0902\u0965 ", "\u0920\u0940\u0915"]),
    ("Yes, I will, of course; but \u2014 well, no.", ["Yes, I will, of course; but \u2014 well, no."]),
])
def test_sentences(text, expected):
    assert pieces(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes, I will, of course; but \u2014 well, no.", ["Yes, I will, ", "of course; ", "but \u2014 well, ", "no."]),
    ("Yes, sir. No, never.", ["Yes, sir. ", "No, never."]),
    ('"Fine," she said, "go."', ['"Fine," she said, ', '"go."']),
    ("Well \u2014 I think so.", ["Well \u2014 I think so."]),
    ("I think \u2014 no, wait.", ["I think \u2014 ", "no, wait."]),
    ("From 1990\u20132000, and 1,000 men: 3:30 sharp.", ["From 1990\u20132000, ", "and 1,000 men: ", "3:30 sharp."]),
    ("One thing, \u2014 then.", ["One thing, \u2014 ", "then."]),
    ("\u662f\u7684\uff0c\u6211\u4f1a\u7684\uff0c\u597d\uff0c\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
     ["\u662f\u7684\uff0c", "\u6211\u4f1a\u7684\uff0c", "\u597d\uff0c\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002"]),
    (("\u0646\u0639\u0645 \u0633\u064a\u062f\u064a\u060c \u0633\u0623\u0641\u0639\u0644 \u0630\u0644\u0643\u061b "
      "\u0627\u0644\u0622\u0646"), ["\u0646\u0639\u0645 \u0633\u064a\u062f\u064a\u060c ",
                                "\u0633\u0623\u0641\u0639\u0644 \u0630\u0644\u0643\u061b ", "\u0627\u0644\u0622\u0646"]),
])
def test_clauses(text, expected):
    """Clauses of at least two words (a CJK character is one): a lone "Yes, " runs on into the next clause."""
    assert pieces(text, clauses=True) == expected


COVER_TEXTS = [
    '"Stop!" he said. Then he left... Or did he?! (Yes.) It was 3.5 e.g. Mr. X.',
    "\u4f60\u597d\u3002\u300c\u6211\u300d\u5f88\u597d\uff0110\uff1a30\uff0c\u8d70\u5427\u3002",
    "Hello. ... World \u2014 and, well, no; fine. \U0001f600  End. ",
    "\u0928\u092e\u0938\u094d\u0924\u0947\u0964 \u0906\u092a \u0915\u0948\u0938\u0947 \u0939\u0948\u0902\u0965 \u0920\u0940\u0915",
    "Yes, I will, of course; but \u2014 well, no. \u0645\u0631\u062d\u0628\u0627\u061f \u0643\u064a\u0641\u060c \u062d\u0627\u0644\u0643",
]


@pytest.mark.parametrize("clauses", [False, True])
@pytest.mark.parametrize("text", COVER_TEXTS)
def test_the_pieces_do_not_depend_on_the_chunking(text, clauses):
    """Cut in three at every pair of points, and chunked at random: always the same pieces, covering the text."""
    whole = streamed([text], clauses)
    assert [p.index for p in whole] == list(range(len(whole))) and len(whole) >= 3
    assert "".join(p.text for p in whole) == text
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            assert streamed([text[:a], text[a:b], text[b:]], clauses) == whole, (a, b)
    rng = random.Random(len(text))
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, len(text))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert streamed(chunks, clauses) == whole
    assert streamed(list(text), clauses) == whole


def test_a_piece_is_sent_once_the_first_character_after_it_arrives():
    segmenter = Segmenter()
    assert segmenter.feed("Hi") == [] and segmenter.feed(".") == [] and segmenter.feed("  ") == []
    assert segmenter.feed('"') == []  # still no word: the quote could belong to either piece
    assert segmenter.feed("Yo") == [Piece(0, "Hi.  ")]
    assert segmenter.feed(' there!" Then') == [Piece(1, '"Yo there!" ')]
    assert segmenter.finish('Hi.  "Yo there!" Then') == [Piece(2, "Then")]  # the cover is exact from where it ended
    cjk = Segmenter()
    assert cjk.feed("\u4f60\u597d\u3002") == []  # a closing bracket may follow
    assert cjk.feed("\u300d") == []
    assert cjk.feed("\u6211") == [Piece(0, "\u4f60\u597d\u3002\u300d")]


def test_finish_covers_a_final_text_longer_than_the_deltas():
    segmenter = Segmenter()
    assert segmenter.feed("One. Two") == [Piece(0, "One. ")]
    assert segmenter.finish("One. Two. Three, four. ") == [Piece(1, "Two. "), Piece(2, "Three, four. ")]
    assert Segmenter().finish("") == [] and Segmenter().finish("  ") == [Piece(0, "  ")]
    done = Segmenter()
    assert done.feed("Done. Yes") == [Piece(0, "Done. ")] and done.finish("Done. ") == []


def test_the_mark_sets_can_be_replaced():
    assert pieces("a | b. c", sentence_marks="|") == ["a | ", "b. c"]
    assert pieces("one two; three four, five", clauses=True, clause_marks=";") == ["one two; ", "three four, five"]
    assert pieces("ok. then", sentence_marks="\u3002") == ["ok. then"]


def test_default_marks_as_documented():
    for mark in ".!?\u2026\u3002\uff01\uff1f\u061f\u0964\u0965":
        assert mark in SENTENCE_MARKS
    for mark in ",;:\u2014\u2013\uff0c\u3001\uff1b\uff1a\u060c\u061b":
        assert mark in CLAUSE_MARKS
    assert marks_problem(SENTENCE_MARKS) is None and marks_problem(CLAUSE_MARKS) is None
    assert not set(SENTENCE_MARKS) & set(CLAUSE_MARKS)


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    daemon_config.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_marks_are_daemon_settings(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    bundled = daemon_config.load(environ={}, cwd=repo)
    assert (bundled.sentence_marks, bundled.clause_marks) == (SENTENCE_MARKS, CLAUSE_MARKS)
    assert DaemonConfig().sentence_marks == SENTENCE_MARKS and DaemonConfig().clause_marks == CLAUSE_MARKS
    (tmp_path / "npcd.yaml").write_text("sentence_marks: '.\u3002'\nclause_marks: ','\n", encoding="utf-8")
    config = daemon_config.load(environ={}, cwd=tmp_path)
    assert (config.sentence_marks, config.clause_marks) == (".\u3002", ",")
    config = daemon_config.load(_flags("--clause-marks", ";"), environ={"NPCD_SENTENCE_MARKS": "!"}, cwd=tmp_path)
    assert (config.sentence_marks, config.clause_marks) == ("!", ";")


@pytest.mark.parametrize("text, message", [
    ("sentence_marks: ''\n", "sentence_marks must not be empty"),
    ("clause_marks: ',a'\n", "clause_marks must hold only punctuation marks, got 'a' (U+0061)"),
    ("sentence_marks: '. '\n", "sentence_marks must hold only punctuation marks, got ' ' (U+0020)"),
    ("sentence_marks: 5\n", "sentence_marks must hold only punctuation marks, got '5'"),
    ("sentence_marks: [.]\n", "sentence_marks must be a string of punctuation marks, got ['.']"),
    ("clause_marks: ',.'\n", "sentence_marks and clause_marks share '.'"),
])
def test_bad_marks_are_refused_naming_the_setting(tmp_path, text, message):
    (tmp_path / "npcd.yaml").write_text(text)
    with pytest.raises(ValueError) as info:
        daemon_config.load(environ={}, cwd=tmp_path)
    assert str(info.value).startswith(str(tmp_path / "npcd.yaml") + ": ") and message in str(info.value)


def test_an_unknown_segmentation_is_refused():
    with pytest.raises(RequestError) as info:
        validate(pb.SayRequest(persona="p", line="Hi", segmentation=7), Limits())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("segmentation: unknown value 7")


# --- a real daemon on the bundled model -------------------------------------------------------------------------

MOODS = "emotions: [calm, cheerful, worried]\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory, real_model_dir):
    directory = tmp_path_factory.mktemp("personas")
    write_persona(directory, "smith", extra=MOODS,
                  system_prompt="You are Brom, the village blacksmith. Answer in three short sentences.")
    with running_daemon(directory, engine_config(real_model_dir, max_batch_size=4, max_seq_len=512)) as (_, stub):
        yield stub


def sentences_follow_the_deltas(events: list[pb.Event], clauses: bool = False) -> list[str]:
    """Sentence events in index order, each right after the delta that completed it (the rest right before
    Finished), adding up to Finished.text; returns their texts."""
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    finished = events[-1].finished
    texts, so_far = [], ""
    for event in events:
        if event.HasField("delta"):
            so_far += event.delta.text
        elif event.HasField("sentence"):
            assert event.sentence.index == len(texts), kinds
            texts.append(event.sentence.text)
            assert so_far.startswith("".join(texts)), (so_far, texts)  # never ahead of the text
    assert texts and "".join(texts) == finished.text == so_far
    replay, expected = Segmenter(clauses=clauses), []
    for event in events:
        if event.HasField("delta"):
            expected += ["delta"] + [p.text for p in replay.feed(event.delta.text)]
    expected += [p.text for p in replay.finish(finished.text)]
    actual = [e.sentence.text if e.HasField("sentence") else "delta" for e in events
              if e.HasField("sentence") or e.HasField("delta")]
    assert actual == expected
    return texts


@pytest.mark.slow
def test_real_lines_send_sentences_as_they_complete(served):
    lines = ["What do you sell?", "Tell me about your forge.", "Is the road north safe?"]
    streamed_early = 0
    for i, line in enumerate(lines):
        events = say(served, request_id=f"s{i}", persona="smith", line=line, segmentation=pb.SEGMENTATION_SENTENCE,
                     sampling=pb.SamplingOverrides(max_tokens=48))
        texts = sentences_follow_the_deltas(events)
        streamed_early += len(texts) - 1  # all but the last came before Finished's own turn
        clause_events = say(served, request_id=f"c{i}", persona="smith", line=line,
                            segmentation=pb.SEGMENTATION_CLAUSE, sampling=pb.SamplingOverrides(max_tokens=48))
        clauses = sentences_follow_the_deltas(clause_events, clauses=True)
        assert len(clauses) >= len(texts)  # the same greedy text, cut at least as often
    assert streamed_early >= 2, "the bundled model's lines held fewer than two sentence ends mid-line"
    plain = say(served, request_id="n", persona="smith", line=lines[0], sampling=pb.SamplingOverrides(max_tokens=48))
    assert not any(e.HasField("sentence") for e in plain)  # SEGMENTATION_NONE: none


@pytest.mark.slow
def test_a_structured_line_sends_sentences_of_its_spoken_text(served):
    events = say(served, request_id="j", persona="smith", line="Good morning! How is business?", structured=True,
                 segmentation=pb.SEGMENTATION_SENTENCE, sampling=pb.SamplingOverrides(max_tokens=64))
    assert [e.WhichOneof("kind") for e in events].count("emotion") == 1
    texts = sentences_follow_the_deltas(events)
    assert '"say"' in events[-1].finished.json and "".join(texts) == events[-1].finished.text


@pytest.mark.slow
def test_an_unknown_segmentation_is_refused_over_grpc(served):
    with pytest.raises(grpc.RpcError) as info:
        say(served, request_id="bad", persona="smith", line="Hi", segmentation=9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("segmentation: unknown value 9")
    session = SessionClient(served, timeout=RPC_TIMEOUT_S)
    session.send([pb.SayRequest(request_id="bad", persona="smith", line="Hi", segmentation=3)])
    session.close()
    [event] = list(session)
    assert event.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "segmentation" in event.error.message
