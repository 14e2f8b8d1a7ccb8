// Tests of the C# binding against a real daemon, through the native library. One flow per
// run, with the same environment as the C tests (cpp_client/tests/client_test.c):
//   mono ClientTest.exe stream|tick|cancel|large|personas|conversations   needs NPCD_TEST_ADDR
//   mono ClientTest.exe structured           needs NPCD_TEST_ADDR and a persona "merchant" that
//                                            declares emotions and actions
//   mono ClientTest.exe restart              needs NPCD_TEST_DAEMON_CMD and NPCD_TEST_RESTART_ADDR
//   mono ClientTest.exe busy                 needs NPCD_TEST_BUSY_ADDR (a daemon with max_queue 1)
//   mono ClientTest.exe offline              needs no daemon: argument checks, id reuse after
//                                            Cancel, Dispose inside a handler, the connect queue
//   mono ClientTest.exe secure               needs NPCD_TEST_SECURE_ADDR (mutual TLS + a token), NPCD_TEST_TOKEN,
//                                            NPCD_TEST_CA_PEM, NPCD_TEST_CLIENT_CERT, NPCD_TEST_CLIENT_KEY
// All flows need NPCD_TEST_PERSONAS. Exits 0 on success, 1 on failure, 77 when the
// environment is missing.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;
using System.Threading.Tasks;
using Npcd;

internal sealed class TestFailure : Exception
{
    public TestFailure(string message) : base(message) { }
}

/// <summary>Everything one line raised, checked as it arrives.</summary>
internal sealed class Recorder
{
    public readonly NpcdLine Line;
    public readonly List<string> Kinds = new List<string>();
    public string Deltas = string.Empty;
    public readonly List<NpcdAction> Actions = new List<NpcdAction>();
    public readonly List<string> Emotions = new List<string>();
    public readonly List<NpcdSentence> Sentences = new List<NpcdSentence>();
    private readonly bool segmented;

    public Recorder(NpcdLine line, bool segmented)
    {
        Line = line;
        this.segmented = segmented;
        line.Started += l => Record("started");
        line.TextDelta += (l, text) => { Record("delta"); Deltas += text; };
        line.ActionChosen += (l, action) => { Record("action"); Actions.Add(action); };
        line.EmotionChanged += (l, label) => { Record("emotion"); Emotions.Add(label); };
        line.SentenceReady += (l, sentence) =>
        {
            Record("sentence");
            Test.Check(sentence.Index == Sentences.Count, Line.Id + ": sentence " + sentence.Index + ", want " + Sentences.Count);
            Sentences.Add(sentence);
            Test.Check(Deltas.StartsWith(Joined()), Line.Id + ": sentences '" + Joined() + "' ahead of the deltas '" + Deltas + "'");
        };
        line.Finished += (l, result) => Record("finished");
        line.Failed += (l, error) => Record("failed");
    }

    private void Record(string kind)
    {
        if (Kinds.Count > 0 && (Kinds[Kinds.Count - 1] == "finished" || Kinds[Kinds.Count - 1] == "failed"))
            throw new TestFailure(Line.Id + ": " + kind + " after the end");
        if (kind == "delta" && !Kinds.Contains("started"))
            throw new TestFailure(Line.Id + ": delta before started");
        if ((kind == "action" || kind == "emotion" || kind == "sentence") && !Kinds.Contains("delta"))
            throw new TestFailure(Line.Id + ": " + kind + " before any delta");
        if (kind == "started" && Kinds.Count > 0)
            throw new TestFailure(Line.Id + ": started twice or late");
        Kinds.Add(kind);
    }

    public void ExpectComplete()
    {
        var r = Line.Result;
        Test.Check(r != null, Line.Id + " did not end");
        Test.Check(!r.Failed, Line.Id + " failed: " + (r.Failed ? r.Error.ToString() : ""));
        Test.Check(r.Reason == FinishReason.Stop || r.Reason == FinishReason.Length, Line.Id + " finished with " + r.Reason);
        Test.Check(Kinds[0] == "started" && Kinds[Kinds.Count - 1] == "finished", Line.Id + ": events " + string.Join(",", Kinds));
        Test.Check(Kinds.Contains("delta") && r.Text.Length > 0, Line.Id + " produced no text");
        Test.Check(Deltas == r.Text && Line.Text == r.Text, Line.Id + ": deltas '" + Deltas + "' != finished text '" + r.Text + "'");
        Test.Check(r.CompletionTokens > 0, Line.Id + ": no completion tokens");
        Test.Check(Line.Completion.IsCompleted && Line.Completion.Result == r, Line.Id + ": Completion does not match");
        Test.Check(r.CachedPromptTokens <= r.PromptTokens, Line.Id + ": " + r.CachedPromptTokens + " cached of " + r.PromptTokens + " prompt tokens");
        if (segmented)
            Test.Check(Sentences.Count > 0 && Joined() == r.Text, Line.Id + ": " + Sentences.Count + " sentences '" + Joined() + "' != text '" + r.Text + "'");
        else
            Test.Check(Sentences.Count == 0, Line.Id + ": sentences without a Segmentation");
    }

    public string Joined()
    {
        var joined = new System.Text.StringBuilder();
        foreach (var sentence in Sentences) joined.Append(sentence.Text);
        return joined.ToString();
    }

    /// <summary>A structured line: its say streamed as text, one emotion and one action, and
    /// the result repeating both with the whole JSON reply.</summary>
    public void ExpectStructured()
    {
        ExpectComplete();
        var r = Line.Result;
        Test.Check(Emotions.Count == 1 && !string.IsNullOrEmpty(Emotions[0]), Line.Id + ": want one non-empty emotion, got " + Emotions.Count);
        Test.Check(Actions.Count == 1 && !string.IsNullOrEmpty(Actions[0].Name), Line.Id + ": want one named action, got " + Actions.Count);
        Test.Check(Actions[0].ArgsJson.StartsWith("{"), Line.Id + ": action args '" + Actions[0].ArgsJson + "' are not a JSON object");
        Test.Check(Line.Emotion == Emotions[0] && Line.Action == Actions[0], Line.Id + ": Line.Emotion / Line.Action differ from the events");
        Test.Check(r.Json.StartsWith("{") && r.Json.Contains("\"say\""), Line.Id + ": json '" + r.Json + "' has no say");
        Test.Check(r.Emotion == Emotions[0], Line.Id + ": result emotion '" + r.Emotion + "' != '" + Emotions[0] + "'");
        Test.Check(r.Action != null && r.Action.Name == Actions[0].Name && r.Action.ArgsJson == Actions[0].ArgsJson,
                   Line.Id + ": result action " + r.Action + " != " + Actions[0]);
    }
}

internal static class Test
{
    private static string[] personas;

    public static void Check(bool ok, string what)
    {
        if (!ok) throw new TestFailure(what);
    }

    private static string Env(string name)
    {
        string v = Environment.GetEnvironmentVariable(name);
        if (string.IsNullOrEmpty(v))
        {
            Console.Error.WriteLine("SKIP: " + name + " is not set");
            Environment.Exit(77);
        }
        return v;
    }

    private static void PumpUntil(NpcdClient client, Func<bool> done, double timeoutS, string what)
    {
        var watch = Stopwatch.StartNew();
        while (true)
        {
            client.Poll();
            if (done()) return;
            Check(watch.Elapsed.TotalSeconds < timeoutS, "timed out after " + timeoutS + " s waiting for " + what);
            Thread.Sleep(10);
        }
    }

    private static NpcdClient Connect(string address, double timeoutS)
    {
        var client = new NpcdClient(address, 100, 1000);
        var watch = Stopwatch.StartNew();
        while (client.State != ConnectionState.Connected)
        {
            Check(watch.Elapsed.TotalSeconds < timeoutS, "not connected to " + address + " after " + timeoutS + " s");
            Thread.Sleep(20);
        }
        return client;
    }

    private static LineRequest Request(string persona, string text, uint maxTokens)
    {
        var r = new LineRequest(persona, text) { Speaker = "Player", MaxTokens = maxTokens, Temperature = 0f };
        r.Context["location"] = "the village square";
        return r;
    }

    private static Recorder Say(NpcdClient client, LineRequest request)
    {
        return new Recorder(client.Say(request), request.Segmentation != Segmentation.None);
    }

    private static async Task<string> AwaitLine(NpcdLine line)
    {
        LineResult result = await line.Completion;
        return result.Text;
    }

    private static void Stream()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            var request = Request(personas[0], "Good morning! What news today?", 16);
            request.History.Add(new Turn("Player", "Hello there."));
            request.NpcId = "npc-1";
            request.Priority = Priority.Player;
            request.Segmentation = Segmentation.Sentence;
            var one = Say(client, request);
            Task<string> awaited = AwaitLine(one.Line);

            var duplicate = Request(personas[0], "Again?", 8);
            duplicate.RequestId = one.Line.Id;
            bool refused = false;
            try { client.Say(duplicate); } catch (ArgumentException) { refused = true; }
            Check(refused, "a duplicate request id was accepted");

            var dropped = Say(client, Request(personas[0], "Never mind.", 8));
            Check(dropped.Line.Cancel(), "cancel of a pending line");
            Check(!client.Cancel("no-such-request"), "cancel of an unknown id succeeded");
            var unknown = Say(client, Request("no-such-persona", "Hello?", 8));

            PumpUntil(client, () => client.ActiveLines == 0, 120, "all lines to end");
            one.ExpectComplete();
            Check(one.Line.Result.HistoryTurns == 1, "the prompt held " + one.Line.Result.HistoryTurns + " earlier turns, want the 1 given");
            Check(awaited.IsCompleted && awaited.Result == one.Line.Result.Text, "the awaited text differs");
            Check(dropped.Line.Result.Reason == FinishReason.Cancelled && !dropped.Line.IsStarted && !dropped.Line.Result.Failed,
                  "a pending line cancelled locally must finish Cancelled without Started");
            Check(unknown.Line.Result.Failed && unknown.Line.Result.Error.Code == 5,
                  "unknown persona: want error 5 (NOT_FOUND), got " + unknown.Line.Result.Error);
            Console.WriteLine("stream: '" + one.Line.Result.Text + "' (" + one.Sentences.Count + " sentences)");
        }
    }

    private static void Tick()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            var all = new List<Recorder>();
            for (int i = 0; i < 16; i++)
            {
                var r = Request(personas[i % personas.Length], "Villager " + i + " asks: how is your day going?", 8);
                r.NpcId = "npc-" + i;
                all.Add(Say(client, r));
            }
            PumpUntil(client, () => client.ActiveLines == 0, 240, "16 lines to end");
            foreach (var rec in all) rec.ExpectComplete();
            Console.WriteLine("tick: 16 lines over " + personas.Length + " personas finished");
        }
    }

    private static void Cancel()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            var rec = Say(client, Request(personas[0], "Tell me the whole history of this village, every family, in great detail.", 400));
            PumpUntil(client, () => rec.Line.Text.Length > 0 || rec.Line.IsDone, 120, "the first delta");
            Check(!rec.Line.IsDone, "the line ended before it could be cancelled");
            Check(rec.Line.Cancel(), "cancel of an in-flight line");
            PumpUntil(client, () => rec.Line.IsDone, 60, "the cancelled line to end");
            var r = rec.Line.Result;
            Check(!r.Failed && r.Reason == FinishReason.Cancelled, "want Cancelled, got " + r.Reason + " " + r.Error);
            Check(r.CompletionTokens < 400, "the cancelled line ran to max_tokens");
            Check(rec.Deltas == r.Text, "deltas '" + rec.Deltas + "' != finished text '" + r.Text + "'");
            Check(!rec.Line.Cancel(), "cancel after the end succeeded");
            Console.WriteLine("cancel: stopped after " + r.CompletionTokens + " tokens");
        }
    }

    private const string StructuredPersona = "merchant";

    private static void Structured()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            var request = Request(StructuredPersona, "I'll take the rope. Here's your silver.", 20);
            request.Structured = true;
            request.Segmentation = Segmentation.Clause;  // clauses of the spoken line
            var persona = Say(client, request);

            // The only action listed: the grammar forces it. Not Structured: a list implies it.
            var listedRequest = Request(StructuredPersona, "Hello there, Fenwick!", 20);
            listedRequest.Actions.Add(new ActionSpec("wave", "wave at the player"));
            var listed = Say(client, listedRequest);

            var formatRequest = Request(StructuredPersona, "What do you sell?", 20);
            formatRequest.ResponseFormat = "{\"type\": \"object\", \"properties\": {\"say\": {\"type\": \"string\", \"maxLength\": 60}, "
                + "\"mood\": {\"enum\": [\"calm\", \"angry\"]}}, \"required\": [\"say\", \"mood\"]}";
            var format = Say(client, formatRequest);

            var badRequest = Request(StructuredPersona, "Wave!", 20);
            badRequest.Actions.Add(new ActionSpec("Wave-Now", "wave"));
            var bad = Say(client, badRequest);

            var nameless = Request(StructuredPersona, "Hm?", 20);
            nameless.Actions.Add(new ActionSpec(null, "no name"));
            bool refused = false;
            try { client.Say(nameless); } catch (ArgumentException) { refused = true; }
            Check(refused, "an action without a name was accepted");

            PumpUntil(client, () => client.ActiveLines == 0, 180, "the structured lines to end");
            persona.ExpectStructured();
            listed.ExpectStructured();
            Check(listed.Actions[0].Name == "wave", "the only action listed is wave, got " + listed.Actions[0].Name);
            Check(listed.Actions[0].ArgsJson == "{}", "wave takes no arguments, got " + listed.Actions[0].ArgsJson);
            format.ExpectComplete();
            var f = format.Line.Result;
            Check(format.Actions.Count == 0 && format.Emotions.Count == 0 && f.Action == null && f.Emotion == null,
                  "a response format of the game's raised an action or emotion");
            Check(f.Json.Contains("\"mood\"") && f.Json.Contains("\"say\""), "response format: json '" + f.Json + "' lacks mood or say");
            var b = bad.Line.Result;
            Check(b.Failed && b.Error.Code == 3 && b.Error.Message.Contains("actions[0].name"),
                  "a bad action name: want error 3 naming actions[0].name, got " + b.Error);
            var p = persona.Line.Result;
            Console.WriteLine("structured: '" + p.Text + "' " + p.Emotion + " " + p.Action + "; listed: " + listed.Line.Result.Json
                              + "; format: " + f.Json);
        }
    }

    private static Process StartDaemon()
    {
        var info = new ProcessStartInfo("/bin/sh", "-c 'eval \"exec $NPCD_TEST_DAEMON_CMD\"'") { UseShellExecute = false };
        return Process.Start(info);
    }

    private static void KillDaemon(Process daemon)
    {
        if (daemon == null || daemon.HasExited) return;
        daemon.Kill();
        daemon.WaitForExit();
    }

    private static void Restart()
    {
        Env("NPCD_TEST_DAEMON_CMD");
        string address = Env("NPCD_TEST_RESTART_ADDR");
        Process daemon = null;
        try
        {
            // The client comes first: a line requested while Connecting waits for the connection.
            using (var client = new NpcdClient(new NpcdClientOptions(address)
                   { InitialBackoffMs = 100, MaxBackoffMs = 1000, ConnectQueueTimeoutMs = 240000 }))
            {
                Check(client.State == ConnectionState.Connecting, "a new client is not Connecting: " + client.State);
                var early = Say(client, Request(personas[0], "Are you open yet?", 8));
                client.Poll();
                Thread.Sleep(300);
                Check(client.Poll() == 0 && !early.Line.IsDone, "a line queued while Connecting ended before any daemon ran");
                daemon = StartDaemon();
                PumpUntil(client, () => early.Line.IsDone, 240, "the line queued while Connecting");
                early.ExpectComplete();

                var before = Say(client, Request(personas[0], "Hello!", 8));
                PumpUntil(client, () => before.Line.IsDone, 120, "the line before the restart");
                before.ExpectComplete();

                var cut = Say(client, Request(personas[0], "Tell me the whole history of this village, every family, in great detail.", 400));
                PumpUntil(client, () => cut.Line.Text.Length > 0 || cut.Line.IsDone, 120, "the first delta before the kill");
                Check(!cut.Line.IsDone, "the line ended before the daemon was killed");
                KillDaemon(daemon);
                PumpUntil(client, () => cut.Line.IsDone, 30, "the error of the line cut by the kill");
                Check(cut.Line.Result.Failed && cut.Line.Result.Error.Code == 14,
                      "want error 14 (UNAVAILABLE) for the cut line, got " + cut.Line.Result.Error);

                PumpUntil(client, () => client.State != ConnectionState.Connected, 10, "the client to notice the daemon is gone");
                Check(client.State == ConnectionState.Disconnected, "after losing the daemon: want Disconnected, got " + client.State);
                var offline = Say(client, Request(personas[0], "Anyone there?", 8));
                PumpUntil(client, () => offline.Line.IsDone, 10, "the error of a line requested while offline");
                Check(offline.Line.Result.Failed && offline.Line.Result.Error.Code == 14,
                      "want error 14 for a line requested while offline, got " + offline.Line.Result.Error);

                daemon = StartDaemon();
                PumpUntil(client, () => client.State == ConnectionState.Connected, 180, "the reconnect");
                var after = Say(client, Request(personas[personas.Length - 1], "Welcome back!", 8));
                PumpUntil(client, () => after.Line.IsDone, 120, "the line after the restart");
                after.ExpectComplete();
                Console.WriteLine("restart: cut line got '" + cut.Line.Result.Error.Message + "'; after reconnect: '" + after.Line.Result.Text + "'");
            }
        }
        finally
        {
            KillDaemon(daemon);
        }
    }

    /// <summary>A line over the 4 MiB message limit is refused before anything is sent; the client
    /// goes on, and a frame of 70 lines of ~61 KB (split over several Ticks) ends line by line.</summary>
    // ListPersonas: every test persona, ready, with its metadata; a closed port throws NpcdUnavailableException.
    private static void Personas()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            var listed = client.ListPersonas(10000);
            Check(listed.Length == personas.Length, listed.Length + " personas listed, want " + personas.Length);
            foreach (var id in personas)
            {
                var p = Array.Find(listed, x => x.Id == id);
                Check(p != null, "persona " + id + " not listed");
                Check(p.Status == PersonaStatus.Ready && p.Error == "", id + ": " + p.Status + " '" + p.Error + "'");
                Check(p.DisplayName.Length > 0 && p.MetadataJson.StartsWith("{"), id + ": " + p.DisplayName + " " + p.MetadataJson);
                Check(p.HasAdapter == (id != "plain"), id + ": HasAdapter " + p.HasAdapter);
                if (id == "merchant")
                    Check(p.MetadataJson.Contains("\"voice_id\":\"merchant_01\""), "merchant metadata " + p.MetadataJson);
            }
        }
        using (var closed = new NpcdClient("127.0.0.1:1", 50, 200))
        {
            try
            {
                closed.ListPersonas(3000);
                throw new TestFailure("a closed port listed personas");
            }
            catch (NpcdUnavailableException e)
            {
                Check(e.Code == 14 || e.Code == 4, "a closed port gave code " + e.Code + ": " + e.Message);
            }
        }
        Console.WriteLine("personas: " + personas.Length + " listed");
    }

    // One finished line of `conversation`; returns how many earlier turns its prompt held.
    private static int ConversationLine(NpcdClient client, string conversation, string text)
    {
        var request = Request(personas[0], text, 8);
        request.Conversation = conversation;
        var r = Say(client, request);
        PumpUntil(client, () => r.Line.IsDone, 120, r.Line.Id);
        r.ExpectComplete();
        return r.Line.Result.HistoryTurns;
    }

    private static void Conversations()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            string conversation = "cs-save-" + Process.GetCurrentProcess().Id;
            client.ResetConversation(conversation, personas[0], 10000);
            Check(ConversationLine(client, conversation, "Good morning.") == 0, "a new conversation held history");
            byte[] saved = client.ExportConversations(personas[0], 10000);
            Check(saved.Length > 0, "an empty blob");
            Check(ConversationLine(client, conversation, "Any news?") >= 2, "the second line held no history");
            client.ResetConversation(conversation, personas[0], 10000);
            Check(ConversationLine(client, conversation, "Hello?") == 0, "a reset conversation still held history");
            Check(client.ImportConversations(saved, true, 10000) >= 1, "the import restored nothing");
            int restored = ConversationLine(client, conversation, "Where were we?");
            Check(restored == 2, "after the import the line held " + restored + " earlier turns, want the save's 2");
            var kept = client.GetConversation(conversation, personas[0], 10000);
            Check(kept.Turns.Length == 4 && kept.Turns[0].Text == "Good morning." && !kept.Turns[0].Npc && kept.Turns[1].Npc &&
                  kept.Turns[2].Text == "Where were we?" && kept.Summary == "",
                  "the kept turns: " + string.Join(" | ", Array.ConvertAll(kept.Turns, t => (t.Npc ? "[npc] " : "") + t.Speaker + ": " + t.Text)));
            client.AddTurn(conversation, personas[0], "Narrator", "The bell rang twice.");
            var added = client.GetConversation(conversation, personas[0], 10000).Turns;
            Check(added.Length == 5 && added[4].Speaker == "Narrator" && added[4].Text == "The bell rang twice.",
                  "the added turn: " + added.Length + " turns");
            try
            {
                client.AddTurn(conversation, "no-such-persona", "Narrator", "x");
                throw new TestFailure("a turn for an unknown persona was added");
            }
            catch (NpcdUnavailableException e)
            {
                Check(e.Code == 5, "an unknown persona gave code " + e.Code + ": " + e.Message);
            }
            try
            {
                client.ImportConversations(System.Text.Encoding.UTF8.GetBytes("not an npcd blob"), true, 10000);
                throw new TestFailure("a corrupt blob was imported");
            }
            catch (NpcdUnavailableException e)
            {
                Check(e.Code == 3, "a corrupt blob gave code " + e.Code + ": " + e.Message);
            }
            Check(ConversationLine(client, conversation, "Still there?") >= 5, "the refused blob lost the conversation");
            var big = Refused(() => client.ImportConversations(new byte[RequestTooLargeException.MaxRequestBytes + 1]), "an oversized blob");
            Check(big is RequestTooLargeException && big.ParamName == "blob", "want RequestTooLargeException(blob), got " + big);
            Check(Refused(() => client.ResetConversation(null, personas[0]), "a null conversation").ParamName == "conversation",
                  "a null conversation not named");
            client.SetConversation(conversation, personas[0],
                                   new[] { new Turn("Player", "I found your ring."), new Turn("NPC", "My ring! Thank you.", true) },
                                   "They met at the market.", 10000);
            var edited = client.GetConversation(conversation, personas[0], 10000);
            Check(edited.Turns.Length == 2 && edited.Turns[0].Text == "I found your ring." && edited.Turns[1].Npc &&
                  edited.Summary == "They met at the market.", "the edited conversation: " + edited.Turns.Length + " turns");
            Check(ConversationLine(client, conversation, "Do you remember me?") == 2, "the next line did not hold the edited turns");
            Check(Refused(() => client.SetConversation(conversation, personas[0], new[] { new Turn("Player", "ok"), new Turn(null, "x") }),
                          "a null speaker").ParamName == "turns[1].Speaker", "a null speaker not named");
            Console.WriteLine("conversations: " + saved.Length + "-byte blob, restored " + restored + " earlier turns");
        }
    }

    private static void Large()
    {
        using (var client = Connect(Env("NPCD_TEST_ADDR"), 60))
        {
            var big = Request(personas[0], new string('a', 5000000), 1);
            var e = Refused(() => client.Say(big), "a 5,000,000-character line");
            Check(e is RequestTooLargeException && e.ParamName == "request", "want RequestTooLargeException, got " + e);
            Check(e.Message.Contains(RequestTooLargeException.MaxRequestBytes.ToString()), "the message names no limit: " + e.Message);
            Check(client.ActiveLines == 0, "the refused line is active");
            var turn = new System.Text.StringBuilder();
            while (turn.Length < 1900) turn.Append("the harvest came in late and the river ran high all spring; ");
            string text = turn.ToString(0, 1900);
            var frame = new List<Recorder>();
            for (int i = 0; i < 70; i++)
            {
                var r = Request(personas[i % personas.Length], "Villager " + i + ": and what of the harvest?", 1);
                for (int t = 0; t < 32; t++) r.History.Add(new Turn(t % 2 == 1 ? "Innkeeper" : "Player", text));
                frame.Add(Say(client, r));
            }
            var last = Say(client, Request(personas[0], "One more word, please.", 8));
            PumpUntil(client, () => client.ActiveLines == 0, 300, "the large frame to end");
            foreach (var rec in frame)
            {
                var r = rec.Line.Result;
                Check(!r.Failed || r.Error.Code == 8 || r.Error.Code == 3, rec.Line.Id + ": want Finished, error 8 or 3, got " + r.Error);
            }
            last.ExpectComplete();
            Check(client.State == ConnectionState.Connected, "the session did not survive the large frame: " + client.State);
            Console.WriteLine("large: refused locally (" + e.Message + "); 70 lines in one frame ended, the session lives on");
        }
    }

    private static void Busy()
    {
        using (var client = Connect(Env("NPCD_TEST_BUSY_ADDR"), 60))
        {
            var all = new List<Recorder>();
            for (int i = 0; i < 3; i++) all.Add(Say(client, Request(personas[0], "Quick, a word!", 8)));
            PumpUntil(client, () => client.ActiveLines == 0, 120, "the busy lines to end");
            int finished = 0, refused = 0;
            uint retry = 0;
            foreach (var rec in all)
            {
                var r = rec.Line.Result;
                if (!r.Failed) { rec.ExpectComplete(); finished++; continue; }
                Check(r.Error.Code == 8 && r.Error.Status == "RESOURCE_EXHAUSTED", "want error 8, got " + r.Error);
                Check(r.Error.RetryAfterMs >= 50 && r.Error.RetryAfterMs <= 30000, "RetryAfterMs " + r.Error.RetryAfterMs + " not in 50..30000");
                retry = r.Error.RetryAfterMs;
                refused++;
            }
            Check(finished >= 1 && refused >= 1, "want finished and refused lines, got " + finished + " and " + refused);
            Console.WriteLine("busy: " + finished + " finished, " + refused + " refused (retry after " + retry + " ms)");
        }
    }

    private static ArgumentException Refused(Action action, string what)
    {
        try { action(); }
        catch (ArgumentException e) { return e; }
        throw new TestFailure(what + " was accepted");
    }

    private const string ClosedPort = "127.0.0.1:1";  // nothing listens: the client stays Connecting

    private static void Offline()
    {
        // addresses and options, refused at once
        foreach (var bad in new[] { "no-port", "host:notaport", "host:0", "[::1]" })
        {
            var e = Refused(() => new NpcdClient(bad), "address '" + bad + "'");
            Check(e.ParamName == "address" && e.Message.Contains(bad), "address '" + bad + "': " + e.Message);
        }
        Refused(() => new NpcdClient(new NpcdClientOptions(ClosedPort) { Token = "two words" }), "a token with a space");
        Refused(() => new NpcdClient(new NpcdClientOptions(ClosedPort) { RootCertsPem = "x" }), "root certificates without Tls");
        Refused(() => new NpcdClient(new NpcdClientOptions(ClosedPort) { Tls = true, ClientCertPem = "x" }), "a client certificate without its key");
        var nul = Refused(() => new NpcdClient(new NpcdClientOptions(ClosedPort) { Token = "ab\0cd" }), "a token with a NUL");
        Check(nul.ParamName == "Token", "a NUL in the token: ParamName " + nul.ParamName);
        new NpcdClient(new NpcdClientOptions(ClosedPort) { Token = "s3cr3t-T0ken" }).Dispose();
        new NpcdClient(new NpcdClientOptions(ClosedPort) { Tls = true, TlsServerName = "localhost" }).Dispose();

        using (var client = new NpcdClient(new NpcdClientOptions(ClosedPort) { ConnectQueueMax = 2, ConnectQueueTimeoutMs = 400 }))
        {
            Check(client.State == ConnectionState.Connecting, "want Connecting, got " + client.State);

            // embedded NULs and lone surrogates: refused naming the field, before anything is queued
            var cases = new List<KeyValuePair<string, Action<LineRequest>>>
            {
                new KeyValuePair<string, Action<LineRequest>>("Line", r => r.Line = "a\0b"),
                new KeyValuePair<string, Action<LineRequest>>("Persona", r => r.Persona = "merch\0ant"),
                new KeyValuePair<string, Action<LineRequest>>("Speaker", r => r.Speaker = "Pl\uD800ayer"),
                new KeyValuePair<string, Action<LineRequest>>("NpcId", r => r.NpcId = "npc\uDC00"),
                new KeyValuePair<string, Action<LineRequest>>("RequestId", r => r.RequestId = "id\0"),
                new KeyValuePair<string, Action<LineRequest>>("History[0].Text", r => r.History.Add(new Turn("Player", "hi\uD83D"))),
                new KeyValuePair<string, Action<LineRequest>>("Context[mood]", r => r.Context["mood"] = "\uDE00calm"),
                new KeyValuePair<string, Action<LineRequest>>("Stop[0]", r => r.Stop.Add("\0")),
                new KeyValuePair<string, Action<LineRequest>>("Actions[0].Description", r => r.Actions.Add(new ActionSpec("wave", "\uD800"))),
                new KeyValuePair<string, Action<LineRequest>>("ResponseFormat", r => r.ResponseFormat = "{\"a\":\"\0\"}"),
                new KeyValuePair<string, Action<LineRequest>>("Conversation", r => r.Conversation = "guard\0talk"),
                new KeyValuePair<string, Action<LineRequest>>("Segmentation", r => r.Segmentation = (Segmentation)7),
            };
            foreach (var c in cases)
            {
                var request = Request(personas[0], "Hello", 8);
                c.Value(request);
                var e = Refused(() => client.Say(request), c.Key);
                Check(e.ParamName == c.Key, c.Key + ": ParamName is " + e.ParamName + " (" + e.Message + ")");
            }
            var paired = Say(client, Request(personas[0], "A smile: \uD83D\uDE00, caf\u00E9", 8));  // a proper pair is fine
            Check(client.ActiveLines == 1, "refused requests left lines behind: " + client.ActiveLines);

            // a request id reused right after Cancel, in the same frame: refused before it goes out
            var first = Request(personas[0], "first", 8);
            first.RequestId = "reuse-1";
            var firstRec = Say(client, first);
            Check(firstRec.Line.Cancel(), "cancel of a pending line");
            var again = Request(personas[0], "again", 8);
            again.RequestId = "reuse-1";
            var reuse = Refused(() => client.Say(again), "an id reused before its cancelled line ended");
            Check(reuse.ParamName == "RequestId", "reuse: ParamName " + reuse.ParamName);
            client.Poll();
            Check(firstRec.Line.IsDone && firstRec.Line.Result.Reason == FinishReason.Cancelled, "the cancelled line did not end Cancelled");
            Check(!client.Cancel("reuse-1"), "the refused request went out anyway (the native side knows reuse-1)");
            var second = Say(client, again);  // now the id is free
            Check(client.ActiveLines == 2, "want 2 active lines, got " + client.ActiveLines);

            // the connect queue: over ConnectQueueMax fails at once with 8; the rest time out with 14
            var over = Say(client, Request(personas[0], "over", 8));
            PumpUntil(client, () => over.Line.IsDone, 5, "the line over ConnectQueueMax");
            Check(over.Line.Result.Failed && over.Line.Result.Error.Code == 8, "over ConnectQueueMax: " + over.Line.Result.Error);
            PumpUntil(client, () => paired.Line.IsDone && second.Line.IsDone, 5, "the queue timeout");
            Check(paired.Line.Result.Failed && paired.Line.Result.Error.Code == 14
                  && paired.Line.Result.Error.Message.Contains("connect_queue_timeout_ms"), "queue timeout: " + paired.Line.Result.Error);
        }

        // Dispose inside a Finished handler, with more events of the same batch still to come
        var owner = new NpcdClient(ClosedPort);
        var recs = new List<Recorder>();
        for (int i = 0; i < 5; i++) recs.Add(Say(owner, Request(personas[0], "line " + i, 8)));
        int finishedSeen = 0;
        recs[0].Line.Finished += (l, r) => { finishedSeen++; owner.Dispose(); };
        foreach (var rec in recs) Check(rec.Line.Cancel(), "cancel");
        owner.Poll();
        Check(finishedSeen == 1, "the disposing handler ran " + finishedSeen + " times");
        Check(recs[0].Line.Result.Reason == FinishReason.Cancelled && !recs[0].Line.Result.Failed, "the first line: " + recs[0].Line.Result.Reason);
        for (int i = 1; i < recs.Count; i++)
            Check(recs[i].Line.IsDone && recs[i].Line.Result.Failed && recs[i].Line.Result.Error.Code == 1,
                  "line " + i + " after Dispose: " + (recs[i].Line.Result == null ? "not ended" : recs[i].Line.Result.Error + ""));
        Check(Refused2<ObjectDisposedException>(() => owner.Poll()), "Poll after Dispose did not throw ObjectDisposedException");
        owner.Dispose();  // twice: nothing
        Console.WriteLine("offline: argument checks, id reuse after Cancel, Dispose inside Finished, connect queue");
    }

    /// <summary>One line, requested while Connecting so that it is the first Tick of the first stream.</summary>
    private static LineResult SecureLine(NpcdClientOptions options, double timeoutS, string what)
    {
        using (var client = new NpcdClient(options))
        {
            var rec = Say(client, Request(personas[0], "Who goes there?", 8));
            PumpUntil(client, () => rec.Line.IsDone, timeoutS, what);
            if (!rec.Line.Result.Failed) rec.ExpectComplete();
            return rec.Line.Result;
        }
    }

    private static void Secure()
    {
        string address = Env("NPCD_TEST_SECURE_ADDR");
        string token = Env("NPCD_TEST_TOKEN");
        Func<NpcdClientOptions> options = () => new NpcdClientOptions(address)
        {
            InitialBackoffMs = 100, MaxBackoffMs = 1000, ConnectQueueTimeoutMs = 60000, Token = token, Tls = true,
            RootCertsPem = System.IO.File.ReadAllText(Env("NPCD_TEST_CA_PEM")),
            ClientCertPem = System.IO.File.ReadAllText(Env("NPCD_TEST_CLIENT_CERT")),
            ClientKeyPem = System.IO.File.ReadAllText(Env("NPCD_TEST_CLIENT_KEY")),
            TlsServerName = "localhost",
        };
        var ok = SecureLine(options(), 120, "a line with TLS, a client certificate and the token");
        Check(!ok.Failed, "mutual TLS + token failed: " + ok.Error);

        var o = options();
        o.Token = null;
        var none = SecureLine(o, 60, "a line without the token");
        Check(none.Failed && none.Error.Code == 16 && none.Error.Status == "UNAUTHENTICATED" && none.Error.Message.Contains("missing"),
              "no token: want error 16 saying missing, got " + none.Error);
        o = options();
        o.Token = "not-the-token";
        var wrong = SecureLine(o, 60, "a line with a wrong token");
        Check(wrong.Failed && wrong.Error.Code == 16 && wrong.Error.Message.Contains("wrong"), "wrong token: want error 16, got " + wrong.Error);

        o = options();
        o.ClientCertPem = null;
        o.ClientKeyPem = null;
        o.ConnectQueueTimeoutMs = 1500;
        var nocert = SecureLine(o, 30, "a line without a client certificate");
        Check(nocert.Failed && nocert.Error.Code == 14 && nocert.Error.Message.Contains("connect_queue_timeout_ms"),
              "no client certificate: want error 14 after the connect timeout, got " + nocert.Error);
        Console.WriteLine("secure: mutual TLS + token '" + ok.Text + "'; no token: " + none.Error + "; no certificate: " + nocert.Error);
    }

    private static bool Refused2<T>(Action action) where T : Exception
    {
        try { action(); }
        catch (T) { return true; }
        return false;
    }

    public static int Main(string[] args)
    {
        if (args.Length != 1)
        {
            Console.Error.WriteLine("usage: ClientTest.exe stream|tick|cancel|structured|restart|busy|offline|secure|large|personas");
            return 2;
        }
        personas = Env("NPCD_TEST_PERSONAS").Split(',');
        try
        {
            switch (args[0])
            {
                case "stream": Stream(); break;
                case "tick": Tick(); break;
                case "cancel": Cancel(); break;
                case "structured": Structured(); break;
                case "restart": Restart(); break;
                case "busy": Busy(); break;
                case "offline": Offline(); break;
                case "secure": Secure(); break;
                case "large": Large(); break;
                case "personas": Personas(); break;
                case "conversations": Conversations(); break;
                default:
                    Console.Error.WriteLine("unknown flow " + args[0]);
                    return 2;
            }
        }
        catch (Exception e)
        {
            Console.Error.WriteLine("FAIL: " + e);
            return 1;
        }
        return 0;
    }
}
