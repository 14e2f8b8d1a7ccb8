// The first line a game developer runs: list the daemon's personas, ask one for a line, print
// the text as it streams, the way a game loop would (Poll once per "frame"). Engine-free C#, so
// it compiles against the binding inside any of the packages (Unity's Runtime/Binding, Godot's
// binding/) with nothing but Mono:
//
//   mcs -out:FirstLine.exe <package>/Runtime/Binding/*.cs FirstLine.cs
//   LD_LIBRARY_PATH=<package>/Plugins/Linux/x86_64 mono FirstLine.exe [address] [persona] [line]
//
// Defaults: 127.0.0.1:50051, the first persona the daemon lists, "Any news from the road?".
// Exits 0 when the line finished, 1 when it failed (the error on stderr), 2 when the daemon
// could not be reached.
using System;
using System.Diagnostics;
using System.Threading;
using Npcd;

internal static class FirstLine
{
    // A frame of a 60 Hz game, and how long the sample waits for a whole line.
    private const int FrameMs = 16;
    private const int LineTimeoutMs = 120000;

    private static int Main(string[] args)
    {
        string address = args.Length > 0 ? args[0] : "127.0.0.1:50051";
        string text = args.Length > 2 ? args[2] : "Any news from the road?";
        using (var client = new NpcdClient(address))
        {
            PersonaInfo[] personas;
            try
            {
                personas = client.ListPersonas(10000);
            }
            catch (NpcdUnavailableException e)
            {
                Console.Error.WriteLine("npcd at " + address + " did not answer (code " + e.Code + "): " + e.Message);
                return 2;
            }
            foreach (PersonaInfo p in personas) Console.WriteLine("persona " + p);
            if (personas.Length == 0 && args.Length < 2)
            {
                Console.Error.WriteLine("the daemon serves no persona");
                return 1;
            }
            string persona = args.Length > 1 ? args[1] : personas[0].Id;

            NpcdLine line = client.Say(new LineRequest(persona, text) { Speaker = "Player", MaxTokens = 24 });
            line.TextDelta += (l, delta) => Console.Write(delta);
            var clock = Stopwatch.StartNew();
            while (!line.IsDone && clock.ElapsedMilliseconds < LineTimeoutMs)
            {
                client.Poll();  // every event fires here, on this thread
                Thread.Sleep(FrameMs);
            }
            Console.WriteLine();
            LineResult result = line.Result;
            if (result == null)
            {
                Console.Error.WriteLine("no answer within " + LineTimeoutMs + " ms");
                return 1;
            }
            if (result.Failed)
            {
                Console.Error.WriteLine(persona + " failed: " + result.Error);
                return 1;
            }
            Console.WriteLine(persona + " finished (" + result.Reason + ", " + result.CompletionTokens + " tokens)");
            return 0;
        }
    }
}
